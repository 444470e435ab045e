"""verify.yml's reading of a GPU host's listening sockets, as plain functions the unit tests call.

A GPU host answers the public network on SSH and Tailscale's port only (CONTRACTS §3); ufw's
rules are one guard, but Docker's published ports bypass them, and a service bound to a public
address is one firewall change away from being exposed. So verify reads `ss -Htulnp` and
names every socket that listens on an address that is neither loopback nor the tailnet's,
unless an entry of the allowed list (process, protocol, port) covers it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable

# users:(("sshd",pid=73,fd=6),("systemd",pid=1,fd=50))
PROCESS = re.compile(r'\("(?P<name>(?:[^"\\]|\\.)*)",pid=(?P<pid>[0-9]+)')


def _interface_matches(name: str, patterns: Iterable[str]) -> bool:
    """iptables-style names: `br-+` matches every interface whose name starts with `br-`."""
    return any(
        name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern
        for pattern in patterns
    )


def split_local(local: str) -> tuple[str, str, int]:
    """`[fe80::1]%eth0:546` -> ("fe80::1", "eth0", 546); `0.0.0.0:22` -> ("0.0.0.0", "", 22)."""
    host, _, port = local.rpartition(":")
    device = ""
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        if "%" in address:  # some versions print the scope inside the brackets
            address, _, device = address.partition("%")
        if rest.startswith("%"):
            device = rest[1:]
    else:
        address, _, device = host.partition("%")
    return address, device, int(port) if port.isdigit() else 0


def parse_ss(text: str) -> list[dict]:
    """The sockets of `ss -Htulnp`: {proto, address, device, port, local, processes}.

    `processes` is a list of {name, pid}; empty for a kernel socket (the NFS client's, say).
    """
    sockets = []
    for line in text.splitlines():
        fields = line.split(None, 6)
        if len(fields) < 6 or fields[0] not in ("tcp", "udp"):
            continue
        address, device, port = split_local(fields[4])
        users = fields[6] if len(fields) > 6 else ""
        sockets.append(
            {
                "proto": fields[0],
                "address": address,
                "device": device,
                "port": port,
                "local": fields[4],
                "processes": [
                    {"name": m["name"], "pid": int(m["pid"])} for m in PROCESS.finditer(users)
                ],
            }
        )
    return sockets


def tailnet_addresses(ip_addr_json: str, interfaces: Iterable[str]) -> list[str]:
    """The addresses `ip -j addr show` lists on the tailnet's interfaces."""
    patterns = list(interfaces)
    found = []
    for link in json.loads(ip_addr_json or "[]"):
        if _interface_matches(str(link.get("ifname", "")), patterns):
            found += [info["local"] for info in link.get("addr_info", []) if "local" in info]
    return found


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _allowed(sock: dict, allowed: Iterable[dict]) -> bool:
    names = {process["name"] for process in sock["processes"]}
    for entry in allowed:
        if "process" in entry and entry["process"] not in names:
            continue
        if "proto" in entry and entry["proto"] != sock["proto"]:
            continue
        if "port" in entry and int(entry["port"]) != sock["port"]:
            continue
        return True
    return False


def describe(sock: dict) -> str:
    """`python3 (pid 812) on 0.0.0.0:18090/tcp`."""
    who = ", ".join(f"{p['name']} (pid {p['pid']})" for p in sock["processes"])
    where = sock["local"] if sock["address"] != "*" else f"*:{sock['port']}"
    return f"{who or 'a kernel socket (no process)'} on {where}/{sock['proto']}"


def verify_public_listeners(
    ss_text: str,
    ip_addr_json: str,
    tailnet_interfaces: Iterable[str],
    allowed: Iterable[dict],
) -> list[dict]:
    """The sockets that listen on a public address and that no allowed entry covers.

    Public: any address but loopback (127.0.0.0/8, ::1, or bound to `lo`) and the tailnet's
    (an address of a tailnet interface, or a socket bound to one); the wildcards 0.0.0.0,
    :: and * are public. An allowed entry {process, proto, port} covers a socket when every
    key it gives matches (process: any of the socket's processes).
    """
    interfaces = list(tailnet_interfaces)
    tailnet = set(tailnet_addresses(ip_addr_json, interfaces))
    allowed = list(allowed)
    found = []
    for sock in parse_ss(ss_text):
        if sock["device"] == "lo" or _is_loopback(sock["address"]):
            continue
        if _interface_matches(sock["device"], interfaces) or sock["address"] in tailnet:
            continue
        if _allowed(sock, allowed):
            continue
        found.append({**sock, "text": describe(sock)})
    return found


class FilterModule:
    """Listening sockets for verify.yml."""

    def filters(self) -> dict:
        return {"verify_public_listeners": verify_public_listeners}
