"""The firewall role's decisions on ufw's rules (roles/firewall/filter_plugins), on the listing
ufw 0.36 prints for `ufw show added`: plain inbound rules that are not wanted are pruned, every
rule bound to an interface or an address is kept, and a wanted rule is added only when missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "roles/firewall/filter_plugins/firewall_rules.py"
_spec = importlib.util.spec_from_file_location("firewall_rules", PLUGIN)
rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rules)

# Read from a Debian host after these rules were added by hand and by roles.
SHOW_ADDED = """\
Added user rules (see 'ufw status' for running firewall):
ufw allow 22/tcp comment 'ssh'
ufw allow 8080/tcp
ufw allow 8081
ufw limit 2200/tcp
ufw allow from 10.0.0.0/8 to any port 9100 proto tcp
ufw allow in on tailscale0 to any port 8288 proto tcp comment 'comfyume-exchange'
ufw deny 23/tcp
ufw allow 60000:61000/udp
ufw allow 80,443/tcp
ufw allow OpenSSH
ufw allow 'Nginx Full'
ufw allow out 53/udp
ufw allow to 10.1.1.1 port 5000 proto tcp
ufw route allow 7000/tcp
ufw allow in on eth0 from any port 1234
ufw allow 8090/tcp comment 'two words'
ufw allow log 8091/tcp
ufw allow 41641/udp comment 'tailscale'
"""

SSH_22 = {"port": "22", "proto": "tcp", "comment": "ssh"}
TAILSCALE = {"port": "41641", "proto": "udp", "comment": "tailscale"}


def test_only_plain_rules_are_pruned():
    plan = rules.firewall_ufw_plan(SHOW_ADDED, [SSH_22, TAILSCALE])
    assert plan["add"] == []
    assert [rule["key"] for rule in plan["prune"]] == [
        "8080/tcp",
        "8081",
        "2200/tcp",
        "60000:61000/udp",
        "80,443/tcp",
        "app:OpenSSH",
        "app:Nginx Full",
        "8090/tcp",
    ]
    assert plan["prune"][2]["rule"] == "limit"
    assert plan["prune"][5] == {
        "rule": "allow",
        "port": "",
        "proto": "",
        "app": "OpenSSH",
        "key": "app:OpenSSH",
    }


def test_rules_bound_to_an_interface_or_an_address_are_never_pruned():
    pruned = {rule["key"] for rule in rules.firewall_ufw_plan(SHOW_ADDED, [])["prune"]}
    for kept in ("8288/tcp", "9100/tcp", "23/tcp", "53/udp", "5000/tcp", "7000/tcp", "8091/tcp"):
        assert kept not in pruned
    assert "1234" not in " ".join(pruned)


def test_a_moved_ssh_port_replaces_the_old_rule_which_goes_after_the_new_one_is_in():
    ssh_2222 = {"port": "2222", "proto": "tcp", "comment": "ssh"}
    plan = rules.firewall_ufw_plan(SHOW_ADDED, [ssh_2222, TAILSCALE])
    assert plan["add"] == [ssh_2222]
    assert "22/tcp" in [rule["key"] for rule in plan["prune"]]


def test_a_listed_port_is_kept_and_not_added_twice():
    listed = [SSH_22, TAILSCALE, {"port": "8080", "proto": "tcp"}, {"port": "22", "proto": "tcp"}]
    plan = rules.firewall_ufw_plan(SHOW_ADDED, listed)
    assert plan["add"] == []
    assert "8080/tcp" not in [rule["key"] for rule in plan["prune"]]


def test_a_limit_rule_on_a_wanted_port_admits_it_and_stays():
    plan = rules.firewall_ufw_plan("ufw limit 22/tcp\n", [SSH_22])
    assert plan == {"add": [], "prune": []}


def test_nothing_is_pruned_when_pruning_is_off():
    plan = rules.firewall_ufw_plan(SHOW_ADDED, [{"port": "2222", "proto": "tcp"}], prune=False)
    assert plan["prune"] == []
    assert plan["add"] == [{"port": "2222", "proto": "tcp"}]


def test_a_fresh_ufw_gets_every_wanted_rule():
    fresh = "Added user rules (see 'ufw status' for running firewall):\n(None)\n"
    plan = rules.firewall_ufw_plan(fresh, [SSH_22, TAILSCALE])
    assert plan == {"add": [SSH_22, TAILSCALE], "prune": []}


def test_ports_may_be_numbers():
    added = "ufw allow 2222/tcp comment 'ssh'\n"
    plan = rules.firewall_ufw_plan(added, [{"port": 2222, "proto": "tcp"}])
    assert plan == {"add": [], "prune": []}


@pytest.mark.parametrize(
    ("port", "wanted", "admitted"),
    [
        (22, [SSH_22], True),
        ("22", [SSH_22], True),
        (2222, [SSH_22, TAILSCALE], False),
        (41641, [TAILSCALE], False),  # udp does not carry SSH
        (2222, [{"port": "2000:3000", "proto": "tcp"}], True),
        (3001, [{"port": "2000:3000", "proto": "tcp"}], False),
        (443, [{"port": "80,443", "proto": "tcp"}], True),
        (22, [], False),
    ],
)
def test_port_admitted(port, wanted, admitted):
    assert rules.firewall_port_admitted(port, wanted) is admitted
