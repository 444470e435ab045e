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


# ---- DOCKER-USER: containers answer only on the allowed interfaces ---------------------------

# What `iptables -S DOCKER-USER` printed on the simulated host (iptables 1.8.11, nf_tables) after
# the role's section was loaded: the role compares the chain with its rules in this form.
LIVE_RULES = [
    "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    "-i lo -j RETURN",
    "-i tailscale0 -j RETURN",
    "-i docker0 -j RETURN",
    "-i br-+ -j RETURN",
    "-m conntrack --ctstate DNAT -j DROP",
    "-o docker0 -j DROP",
    "-o br-+ -j DROP",
    "-j RETURN",
]


def probe(*lines: str, ipv6: str = "yes") -> str:
    return "\n".join([f"ipv6={ipv6}", *lines]) + "\n"


def live(tool: str, rules_: list[str]) -> list[str]:
    return [f"{tool} -A DOCKER-USER {rule}" for rule in rules_]


def test_the_default_rules_are_those_iptables_prints():
    made = rules.firewall_docker_user_rules(["tailscale0"], ["docker0", "br-+"])
    assert made == LIVE_RULES


def test_replies_pass_first_and_everything_else_returns_to_docker_last():
    made = rules.firewall_docker_user_rules(["tailscale0"], ["docker0"])
    assert made[0] == "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    assert made[-1] == "-j RETURN"
    # Every allowed interface is let through before anything is dropped.
    first_drop = next(i for i, rule in enumerate(made) if rule.endswith("-j DROP"))
    assert all(rule.endswith("-j RETURN") for rule in made[:first_drop])


def test_loopback_always_passes_and_no_interface_is_named_twice():
    made = rules.firewall_docker_user_rules(["lo", "tailscale0", "docker0"], ["docker0"])
    assert [rule for rule in made if rule.startswith("-i ")] == [
        "-i lo -j RETURN",
        "-i tailscale0 -j RETURN",
        "-i docker0 -j RETURN",
    ]


def test_without_an_allowed_interface_only_loopback_and_the_bridges_reach_containers():
    made = rules.firewall_docker_user_rules([], ["docker0"])
    assert [rule for rule in made if rule.startswith("-i ")] == [
        "-i lo -j RETURN",
        "-i docker0 -j RETURN",
    ]
    assert "-o docker0 -j DROP" in made


@pytest.mark.parametrize(
    "name",
    ["", "eth0 -j ACCEPT", "eth0\n-A DOCKER-USER -j ACCEPT", "a-bridge-name-too-long", "br+x", "!"],
)
def test_a_name_that_is_not_an_interface_is_refused(name):
    with pytest.raises(ValueError, match="firewall_docker_allowed_interfaces"):
        rules.firewall_docker_user_rules([name], ["docker0"])


def test_a_bridge_that_is_not_an_interface_is_refused():
    with pytest.raises(ValueError, match="firewall_docker_bridges"):
        rules.firewall_docker_user_rules(["tailscale0"], ["docker0 -j ACCEPT"])


def test_the_restore_section_empties_the_chain_and_fills_it():
    section = rules.firewall_docker_user_restore(["-i lo -j RETURN", "-j RETURN"])
    assert section == (
        "*filter\n"
        ":DOCKER-USER - [0:0]\n"
        "-A DOCKER-USER -i lo -j RETURN\n"
        "-A DOCKER-USER -j RETURN\n"
        "COMMIT\n"
    )


def test_rules_in_force_for_both_families_leave_nothing_to_do():
    state = rules.firewall_docker_user_state(
        probe(*live("iptables", LIVE_RULES), *live("ip6tables", LIVE_RULES)), LIVE_RULES
    )
    assert state == {
        "ipv6": True,
        "tools": ["iptables", "ip6tables"],
        "stale": [],
        "ours": ["iptables", "ip6tables"],
        "foreign": [],
    }


def test_dockers_own_chain_is_stale():
    """What Docker leaves in DOCKER-USER by itself: one RETURN, which admits everything."""
    state = rules.firewall_docker_user_state(
        probe("iptables -A DOCKER-USER -j RETURN", "ip6tables -A DOCKER-USER -j RETURN"),
        LIVE_RULES,
    )
    assert state["stale"] == ["iptables", "ip6tables"]
    assert state["ours"] == []


def test_a_missing_chain_is_stale():
    state = rules.firewall_docker_user_state(probe(), LIVE_RULES)
    assert state["stale"] == ["iptables", "ip6tables"]


def test_a_rule_added_by_hand_or_a_changed_setting_makes_the_chain_stale():
    extra = [*LIVE_RULES[:-1], "-s 203.0.113.7/32 -j RETURN", LIVE_RULES[-1]]
    state = rules.firewall_docker_user_state(
        probe(*live("iptables", extra), *live("ip6tables", LIVE_RULES)), LIVE_RULES
    )
    assert state["stale"] == ["iptables"]
    assert state["ours"] == ["ip6tables"]


@pytest.mark.parametrize("setting", ["no", '"no"', ""])
def test_ipv6_rules_are_only_wanted_where_ufw_manages_ipv6(setting):
    state = rules.firewall_docker_user_state(
        probe(*live("iptables", LIVE_RULES), ipv6=setting), LIVE_RULES
    )
    assert state["tools"] == ["iptables"]
    assert state["stale"] == []


def test_a_quoted_yes_counts():
    state = rules.firewall_docker_user_state(probe(ipv6='"yes"'), LIVE_RULES)
    assert state["ipv6"] is True


def test_docker_user_rules_of_someone_else_in_ufws_files_are_reported():
    foreign = "/etc/ufw/after.rules:37: -A DOCKER-USER -j RETURN -s 10.0.0.0/8"
    state = rules.firewall_docker_user_state(probe(f"foreign={foreign}"), LIVE_RULES)
    assert state["foreign"] == [foreign]
