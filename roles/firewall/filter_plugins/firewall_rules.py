"""The firewall role's decisions about ufw's rules, as plain functions the unit tests call.

They read ufw's own listing of its rules (`ufw show added`, which answers whether ufw is
active or not) and say which wanted rules are missing and which plain inbound rules are not
wanted. Only a plain rule is ever pruned: `ufw allow|limit PORT[/PROTO]` or an application
profile, from anywhere, on any interface, with or without a comment. A rule bound to an
interface, a source or a destination, a logged rule, an outbound, routed, deny or reject rule
belongs to someone else (the app server's exchange admits its port on tailscale0 that way) and
is never touched.
"""

from __future__ import annotations

import re

# One line of `ufw show added` for a plain inbound rule; ufw prints every rule it holds in a
# normal form (`ufw allow in 8080/tcp` is listed as `ufw allow 8080/tcp`).
PLAIN_RULE = re.compile(
    r"^ufw (?P<rule>allow|limit) "
    r"(?:(?P<port>[0-9][0-9,:]*)(?:/(?P<proto>tcp|udp))?|'(?P<quoted_app>[^']+)'|(?P<app>[^\s']+))"
    r"(?: comment '[^']*')?$"
)


def rule_key(port: object, proto: object = None) -> str:
    """`8080/tcp`; `8080` for a rule that covers both protocols."""
    return f"{port}/{proto}" if proto else str(port)


def plain_rules(added: str) -> list[dict]:
    """The plain inbound rules in `ufw show added`, each {rule, port, proto, app, key}."""
    rules = []
    for line in added.splitlines():
        match = PLAIN_RULE.match(line.strip())
        if not match:
            continue
        app = match["quoted_app"] or match["app"]
        rules.append(
            {
                "rule": match["rule"],
                "port": match["port"] or "",
                "proto": match["proto"] or "",
                "app": app or "",
                "key": f"app:{app}" if app else rule_key(match["port"], match["proto"]),
            }
        )
    return rules


def firewall_ufw_plan(added: str, wanted: list[dict], prune: bool = True) -> dict:
    """What to change so that ufw admits exactly the wanted plain inbound rules.

    `add`: the wanted rules ({port, proto, comment}) that no plain rule admits yet (an
    administrator's `limit` on the same port counts: it admits, rate-limited, and is kept).
    `prune`: the plain rules whose port and protocol are not wanted; empty unless prune.
    """
    wanted_keys: dict[str, dict] = {}
    for item in wanted:
        wanted_keys.setdefault(rule_key(item["port"], item["proto"]), item)
    rules = plain_rules(added)
    present = {rule["key"] for rule in rules}
    return {
        "add": [item for key, item in wanted_keys.items() if key not in present],
        "prune": [rule for rule in rules if prune and rule["key"] not in wanted_keys],
    }


def _port_ranges(port: object) -> list[tuple[int, int]]:
    ranges = []
    for part in str(port).split(","):
        ends = part.split(":")
        if all(end.strip().isdigit() for end in ends) and len(ends) in (1, 2):
            ranges.append((int(ends[0]), int(ends[-1])))
    return ranges


def firewall_port_admitted(port: object, wanted: list[dict], proto: str = "tcp") -> bool:
    """Whether one of the wanted rules admits port/proto (ranges and lists included)."""
    number = int(port)
    return any(
        low <= number <= high
        for item in wanted
        if item["proto"] == proto
        for low, high in _port_ranges(item["port"])
    )


class FilterModule:
    """ufw rule decisions for the firewall role."""

    def filters(self) -> dict:
        return {
            "firewall_ufw_plan": firewall_ufw_plan,
            "firewall_port_admitted": firewall_port_admitted,
        }
