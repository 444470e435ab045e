"""The firewall role's decisions about ufw's rules, as plain functions the unit tests call.

They read ufw's own listing of its rules (`ufw show added`, which answers whether ufw is
active or not) and say which wanted rules are missing and which plain inbound rules are not
wanted. Only a plain rule is ever pruned: `ufw allow|limit PORT[/PROTO]` or an application
profile, from anywhere, on any interface, with or without a comment. A rule bound to an
interface, a source or a destination, a logged rule, an outbound, routed, deny or reject rule
belongs to someone else (the app server's exchange admits its port on tailscale0 that way) and
is never touched.

They also write and read the DOCKER-USER chain. Docker's published ports bypass ufw: Docker
rewrites (DNAT) a connection to a published port before ufw's INPUT rules see it and forwards
it to the container, through the FORWARD chain, where Docker sends it first to DOCKER-USER, a
chain it creates but never fills. The rules below, kept in ufw's after.rules and after6.rules
so that they are back at every boot and every `ufw reload`, drop new connections to containers
unless they arrive on an allowed interface (the tailnet's) or from Docker's own bridges.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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


# A name iptables takes for -i/-o: at most 15 characters, `+` at the end for a prefix.
INTERFACE = re.compile(r"^(?=.{1,15}$)[A-Za-z0-9_.@-]+\+?$")

# What each tool reports for DOCKER-USER in the probe of tasks/docker.yml, one rule a line.
PROBE_RULE = re.compile(r"^(?P<tool>iptables|ip6tables) -A DOCKER-USER (?P<rule>.+)$")


def _interfaces(names: Iterable[object], what: str) -> list[str]:
    found: list[str] = []
    for name in names:
        text = str(name)
        if not INTERFACE.match(text):
            raise ValueError(
                f"{what}: {text!r} is not an interface name iptables takes (1 to 15 of"
                " A-Z a-z 0-9 _ . @ -, with + at the end for every name that starts so)"
            )
        if text not in found:
            found.append(text)
    return found


def firewall_docker_user_rules(allowed: Iterable[object], bridges: Iterable[object]) -> list[str]:
    """The DOCKER-USER rules, each as `iptables -S` prints it after `-A DOCKER-USER `.

    Replies and related traffic pass; new connections pass when they arrive on loopback, an
    allowed interface or one of Docker's bridges (containers reaching each other, and the
    outside); any other connection that Docker rewrote to a container (a published port) or
    that would leave through one of Docker's bridges (a container's own address, routed to
    this host) is dropped. Everything else, container traffic included, goes on to Docker's
    own rules.
    """
    allowed_names = _interfaces(allowed, "firewall_docker_allowed_interfaces")
    bridge_names = _interfaces(bridges, "firewall_docker_bridges")
    inbound = _interfaces(["lo", *allowed_names, *bridge_names], "interfaces")
    return [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        *(f"-i {name} -j RETURN" for name in inbound),
        "-m conntrack --ctstate DNAT -j DROP",
        *(f"-o {name} -j DROP" for name in bridge_names),
        "-j RETURN",
    ]


def firewall_docker_user_restore(rules: Iterable[str]) -> str:
    """The rules as an iptables-restore section: DOCKER-USER is emptied, then filled."""
    lines = ["*filter", ":DOCKER-USER - [0:0]", *(f"-A DOCKER-USER {rule}" for rule in rules)]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def firewall_docker_user_state(probe: str, rules: list[str]) -> dict:
    """Which tools' DOCKER-USER chain must be (re)loaded, from the probe's output.

    The probe prints `ipv6=<IPV6 of /etc/default/ufw>`, each tool's rules as `iptables -A
    DOCKER-USER ...`, and `foreign=<file>:<line>: <text>` for each line of ufw's after*.rules
    outside the role's block that names DOCKER-USER. `tools`: iptables, and ip6tables where
    ufw manages IPv6; `stale`: those of them whose chain is not exactly the rules; `ours`:
    every tool whose chain is exactly the rules (what switching the filter off resets);
    `foreign`: those lines.
    """
    live: dict[str, list[str]] = {"iptables": [], "ip6tables": []}
    ipv6 = False
    foreign: list[str] = []
    for raw in probe.splitlines():
        line = raw.strip()
        if line.startswith("ipv6="):
            ipv6 = line.split("=", 1)[1].strip().strip("\"'").lower() == "yes"
        elif line.startswith("foreign="):
            foreign.append(line.split("=", 1)[1])
        elif match := PROBE_RULE.match(line):
            live[match["tool"]].append(match["rule"].strip())
    tools = ["iptables", "ip6tables"] if ipv6 else ["iptables"]
    wanted = list(rules)
    return {
        "ipv6": ipv6,
        "tools": tools,
        "stale": [tool for tool in tools if live[tool] != wanted],
        "ours": [tool for tool in live if wanted and live[tool] == wanted],
        "foreign": foreign,
    }


class FilterModule:
    """ufw and DOCKER-USER rule decisions for the firewall role."""

    def filters(self) -> dict:
        return {
            "firewall_ufw_plan": firewall_ufw_plan,
            "firewall_port_admitted": firewall_port_admitted,
            "firewall_docker_user_rules": firewall_docker_user_rules,
            "firewall_docker_user_restore": firewall_docker_user_restore,
            "firewall_docker_user_state": firewall_docker_user_state,
        }
