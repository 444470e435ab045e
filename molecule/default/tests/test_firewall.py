"""ufw admits only SSH and Tailscale; fail2ban guards sshd."""

from __future__ import annotations


def test_ufw_is_active_with_deny_incoming(gpu_host):
    status = gpu_host.check_output("ufw status verbose")
    assert "Status: active" in status
    assert "deny (incoming)" in status


def test_only_ssh_and_tailscale_are_open(gpu_host):
    rules = [
        line.split()[0]
        for line in gpu_host.check_output("ufw status").splitlines()
        if "ALLOW" in line
    ]
    assert sorted(set(rules)) == ["22/tcp", "41641/udp"]


def test_iptables_carries_the_rules(gpu_host):
    rules = gpu_host.check_output("iptables -S ufw-user-input")
    assert "--dport 22 -j ACCEPT" in rules
    assert "--dport 41641 -j ACCEPT" in rules
    assert "6379" not in rules
    assert "8188" not in rules


def test_fail2ban_guards_sshd(gpu_host):
    assert gpu_host.service("fail2ban").is_running
    jail = gpu_host.check_output("fail2ban-client status sshd")
    assert "Currently banned" in jail
    # fail2ban's own reading of its configuration: the jail blocks the port sshd listens on.
    assert "['port', '22']" in gpu_host.check_output("fail2ban-client -d")
