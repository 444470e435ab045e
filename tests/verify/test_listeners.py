"""verify.yml's reading of listening sockets (playbooks/filter_plugins/listeners.py): every socket
on a public address is named with its process, unless it is loopback, the tailnet's, or covered by
an allowed entry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "playbooks/filter_plugins/listeners.py"
_spec = importlib.util.spec_from_file_location("listeners", PLUGIN)
listeners = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(listeners)

# `ss -Htulnp` on the simulated GPU host (Debian trixie, iproute2 6.x) with a container published
# on 0.0.0.0:18081 and on the default address (127.0.0.1:18080), a server on 0.0.0.0:18090, one
# on the tailnet address, one on :: (dual stack, printed as *), and the nested engine's sockets.
SIM_SS = """\
udp UNCONN 0      0       127.0.0.11:42778 0.0.0.0:*
tcp LISTEN 0      4096     127.0.0.1:46021 0.0.0.0:* users:(("containerd",pid=74,fd=10))
tcp LISTEN 0      5          0.0.0.0:18090 0.0.0.0:* users:(("python3",pid=9132,fd=3))
tcp LISTEN 0      4096       0.0.0.0:18081 0.0.0.0:* users:(("docker-proxy",pid=9056,fd=4))
tcp LISTEN 0      128        0.0.0.0:22    0.0.0.0:* users:(("sshd",pid=73,fd=6))
tcp LISTEN 0      4096    127.0.0.11:32865 0.0.0.0:*
tcp LISTEN 0      4096     127.0.0.1:18080 0.0.0.0:* users:(("docker-proxy",pid=8978,fd=4))
tcp LISTEN 0      5      100.100.0.1:18091 0.0.0.0:* users:(("python3",pid=9134,fd=3))
tcp LISTEN 0      5                *:18092       *:* users:(("python3",pid=9136,fd=3))
tcp LISTEN 0      128           [::]:22       [::]:* users:(("sshd",pid=73,fd=7))
"""

# What an Ubuntu 24.04 GPU host is expected to add, written in ss's format (not read from a Verda
# host): systemd-resolved, systemd-networkd's DHCP clients bound to their interface, ssh.socket
# (systemd holds the port with sshd), rpcbind through its socket unit, tailscaled (WireGuard on
# the wildcard, peerapi on its tailnet addresses), chronyd.
UBUNTU_SS = """\
udp UNCONN 0 0      127.0.0.54:53        0.0.0.0:* users:(("systemd-resolve",pid=610,fd=16))
udp UNCONN 0 0   127.0.0.53%lo:53        0.0.0.0:* users:(("systemd-resolve",pid=610,fd=14))
udp UNCONN 0 0  10.1.2.3%ens3:68        0.0.0.0:* users:(("systemd-network",pid=590,fd=23))
udp UNCONN 0 0 0.0.0.0:111 0.0.0.0:* users:(("rpcbind",pid=700,fd=5),("systemd",pid=1,fd=61))
udp UNCONN 0 0         0.0.0.0:41641     0.0.0.0:* users:(("tailscaled",pid=800,fd=12))
udp UNCONN 0 0       127.0.0.1:323       0.0.0.0:* users:(("chronyd",pid=650,fd=5))
udp UNCONN 0 0 [fe80::5054:ff:fe12:3456]%ens3:546 [::]:* users:(("systemd-network",pid=590,fd=25))
udp UNCONN 0 0            [::]:41641        [::]:* users:(("tailscaled",pid=800,fd=13))
udp UNCONN 0 0           [::1]:323          [::]:* users:(("chronyd",pid=650,fd=6))
tcp LISTEN 0 4096      127.0.0.53%lo:53     0.0.0.0:* users:(("systemd-resolve",pid=610,fd=15))
tcp LISTEN 0 4096 0.0.0.0:111 0.0.0.0:* users:(("rpcbind",pid=700,fd=4),("systemd",pid=1,fd=60))
tcp LISTEN 0 4096   100.101.102.103:45678 0.0.0.0:* users:(("tailscaled",pid=800,fd=20))
tcp LISTEN 0 4096 *:22 *:* users:(("sshd",pid=900,fd=3),("systemd",pid=1,fd=88))
tcp LISTEN 0 4096 [fd7a:115c:a1e0::1234]:45679 [::]:* users:(("tailscaled",pid=800,fd=21))
"""

UBUNTU_IP = json.dumps(
    [
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
        {"ifname": "ens3", "addr_info": [{"family": "inet", "local": "10.1.2.3"}]},
        {
            "ifname": "tailscale0",
            "addr_info": [
                {"family": "inet", "local": "100.101.102.103"},
                {"family": "inet6", "local": "fd7a:115c:a1e0::1234"},
            ],
        },
        {"ifname": "docker0", "addr_info": [{"family": "inet", "local": "172.17.0.1"}]},
    ]
)
SIM_IP = json.dumps(
    [
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
        {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "172.21.0.2"}]},
        {"ifname": "tailscale0", "addr_info": [{"family": "inet", "local": "100.100.0.1"}]},
    ]
)

# The shipped list, as every site gets it.
SHARED = yaml.safe_load((REPO / "playbooks/group_vars/all/main.yml").read_text())
ALLOWED = SHARED["comfyume_public_listeners_allowed"]


def public(ss: str, ip: str = SIM_IP, allowed=None, interfaces=("tailscale0",)) -> list[str]:
    found = listeners.verify_public_listeners(ss, ip, list(interfaces), allowed or [])
    return [sock["text"] for sock in found]


def test_public_listeners_are_named_with_their_process_and_address():
    assert public(SIM_SS, allowed=ALLOWED) == [
        "python3 (pid 9132) on 0.0.0.0:18090/tcp",
        "docker-proxy (pid 9056) on 0.0.0.0:18081/tcp",
        "python3 (pid 9136) on *:18092/tcp",
    ]


def test_without_an_allowed_entry_sshd_is_public_too():
    assert "sshd (pid 73) on 0.0.0.0:22/tcp" in public(SIM_SS)
    assert "sshd (pid 73) on [::]:22/tcp" in public(SIM_SS)


def test_loopback_and_the_tailnet_are_not_public():
    found = " ".join(public(SIM_SS))
    for private in ("127.0.0.1:", "127.0.0.11:", "100.100.0.1:"):
        assert private not in found


def test_the_tailnet_address_is_public_where_it_is_not_on_a_tailnet_interface():
    """Read from the interfaces, not guessed from the address range."""
    found = public(SIM_SS, ip=SIM_IP, allowed=ALLOWED, interfaces=("wg0",))
    assert "python3 (pid 9134) on 100.100.0.1:18091/tcp" in found


def test_a_converged_ubuntu_host_passes_with_the_shipped_list():
    assert public(UBUNTU_SS, ip=UBUNTU_IP, allowed=ALLOWED) == []


def test_the_shipped_list_does_not_cover_the_same_ports_for_other_processes():
    ss = """\
tcp LISTEN 0 4096 0.0.0.0:111 0.0.0.0:* users:(("python3",pid=5,fd=3))
udp UNCONN 0 0 0.0.0.0:41641 0.0.0.0:* users:(("nc",pid=6,fd=3))
udp UNCONN 0 0 0.0.0.0:68 0.0.0.0:* users:(("dnsmasq",pid=7,fd=3))
tcp LISTEN 0 4096 0.0.0.0:2222 0.0.0.0:* users:(("systemd",pid=1,fd=3))
"""
    assert public(ss, ip=UBUNTU_IP, allowed=ALLOWED) == [
        "python3 (pid 5) on 0.0.0.0:111/tcp",
        "nc (pid 6) on 0.0.0.0:41641/udp",
        "dnsmasq (pid 7) on 0.0.0.0:68/udp",
        "systemd (pid 1) on 0.0.0.0:2222/tcp",
    ]


def test_a_bridge_address_is_public():
    """Only loopback and the tailnet are private: a service on docker0's address is flagged."""
    ss = 'tcp LISTEN 0 4096 172.17.0.1:9100 0.0.0.0:* users:(("node_exporter",pid=9,fd=3))\n'
    assert public(ss, ip=UBUNTU_IP, allowed=ALLOWED) == [
        "node_exporter (pid 9) on 172.17.0.1:9100/tcp"
    ]


def test_a_kernel_socket_is_named_as_such():
    ss = "tcp LISTEN 0 64 0.0.0.0:36421 0.0.0.0:*\n"
    assert public(ss) == ["a kernel socket (no process) on 0.0.0.0:36421/tcp"]


def test_a_socket_bound_to_a_tailnet_interface_is_the_tailnets():
    ss = 'udp UNCONN 0 0 0.0.0.0%tailscale0:5353 0.0.0.0:* users:(("x",pid=3,fd=3))\n'
    assert public(ss) == []


def test_an_interface_pattern_matches_its_prefix():
    ss = 'tcp LISTEN 0 5 10.8.0.1:9400 0.0.0.0:* users:(("dcgm-exporter",pid=4,fd=3))\n'
    ip = json.dumps([{"ifname": "wg-fleet", "addr_info": [{"local": "10.8.0.1"}]}])
    assert public(ss, ip=ip, interfaces=("wg-+",)) == []
    assert public(ss, ip=ip, interfaces=("wg0",)) != []


def test_ipv4_mapped_loopback_is_loopback():
    ss = 'tcp LISTEN 0 5 [::ffff:127.0.0.1]:8188 [::]:* users:(("python3",pid=3,fd=3))\n'
    assert public(ss) == []


@pytest.mark.parametrize(
    ("entry", "covered"),
    [
        ({"process": "python3"}, True),
        ({"process": "python3", "port": 18090}, True),
        ({"process": "python3", "port": "18090", "proto": "tcp"}, True),
        ({"process": "python3", "proto": "udp"}, False),
        ({"port": 18090}, True),
        ({"process": "python", "port": 18090}, False),
        ({"port": 18091}, False),
    ],
)
def test_an_entry_covers_a_socket_when_every_key_it_gives_matches(entry, covered):
    ss = 'tcp LISTEN 0 5 0.0.0.0:18090 0.0.0.0:* users:(("python3",pid=9,fd=3))\n'
    assert (public(ss, allowed=[entry]) == []) is covered


@pytest.mark.parametrize(
    ("local", "parsed"),
    [
        ("0.0.0.0:22", ("0.0.0.0", "", 22)),
        ("*:22", ("*", "", 22)),
        ("[::]:22", ("::", "", 22)),
        ("127.0.0.53%lo:53", ("127.0.0.53", "lo", 53)),
        ("[fe80::1]%eth0:546", ("fe80::1", "eth0", 546)),
        ("[fe80::1%eth0]:546", ("fe80::1", "eth0", 546)),
        ("[fd7a:115c:a1e0::1]:41641", ("fd7a:115c:a1e0::1", "", 41641)),
    ],
)
def test_local_addresses_as_ss_prints_them(local, parsed):
    assert listeners.split_local(local) == parsed


def test_lines_that_are_not_sockets_are_skipped():
    assert listeners.parse_ss("Netid State\n\n") == []


def test_processes_are_all_read():
    [sock] = listeners.parse_ss(UBUNTU_SS.splitlines()[3])
    assert sock["processes"] == [{"name": "rpcbind", "pid": 700}, {"name": "systemd", "pid": 1}]
