"""The firewall role never enables a ufw that would cut off the play's own SSH session: its SSH
check (roles/firewall/tasks/ssh.yml) run for real by ansible-playbook on the controller, where no
ufw is called. It stops with a message naming the port and the variable to set."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from localplay import BIN, QUIET, REPO, Run, ansible_env, run, venv_path

PLAYBOOK = Path(__file__).resolve().parent / "ssh-port.yml"
TAILSCALE = {"port": "41641", "proto": "udp", "comment": "tailscale"}


def check(*args: str, env: dict | None = None, **variables: object) -> Run:
    settings = {**QUIET, "PATH": venv_path(), "ANSIBLE_REMOTE_PORT": None, **(env or {})}
    # The controller's own Python runs the probe: localhost's may be any.
    extra = {"ansible_python_interpreter": sys.executable, **variables}
    proc = run(
        [BIN / "ansible-playbook", "-i", "localhost,", PLAYBOOK, *args, "-e", json.dumps(extra)],
        ansible_env(**settings),
        300,
        cwd=REPO,
    )
    found = re.search(r"decided: (\{.*?\})", proc.flat.replace('\\"', '"'))
    proc.decided = json.loads(found[1]) if found else None
    return proc


def test_the_connection_port_must_be_admitted():
    run = check(ansible_port=22, firewall_ssh_ports=[2222])
    assert run.returncode != 0, run.output
    assert "ufw was left as it was on localhost, because it would cut off SSH" in run.flat
    assert "Ansible reaches sshd on port 22/tcp (ansible_port)" in run.flat
    assert "ufw would admit SSH only on 2222/tcp (firewall_ssh_ports;" in run.flat
    assert "Set ansible_port to the port sshd listens on" in run.flat
    assert "add 22 to firewall_ssh_ports" in run.flat


def test_an_admitted_connection_port_passes():
    run = check(ansible_port=2222, firewall_ssh_ports=[2222, "22"])
    assert run.returncode == 0, run.output
    assert run.decided == {"admitted": [2222, 22], "connection": 2222}


def test_check_mode_stops_the_same_way():
    run = check("--check", ansible_port=2222, firewall_ssh_ports=[22])
    assert run.returncode != 0, run.output
    assert "Ansible reaches sshd on port 2222/tcp (ansible_port)" in run.flat


def test_without_ansible_port_the_configured_remote_port_counts():
    """Ansible itself gives remote_port (ansible.cfg, ANSIBLE_REMOTE_PORT) as ansible_port."""
    run = check(env={"ANSIBLE_REMOTE_PORT": "2200"}, firewall_ssh_ports=[22])
    assert run.returncode != 0, run.output
    assert "Ansible reaches sshd on port 2200/tcp" in run.flat


def test_without_any_setting_the_connection_port_is_22():
    run = check(firewall_ssh_ports=[2222])
    assert run.returncode != 0, run.output
    assert "port 22/tcp (no ansible_port set, so the default)" in run.flat


def test_a_forwarded_port_is_named_with_firewall_ssh_connection_port():
    run = check(ansible_port=2200, firewall_ssh_connection_port=22, firewall_ssh_ports=[22])
    assert run.returncode == 0, run.output
    assert run.decided["connection"] == 22


@pytest.mark.parametrize(
    "allowed",
    [
        [TAILSCALE, {"port": "2222", "proto": "tcp", "comment": "ssh, by hand"}],
        [TAILSCALE, {"port": "2000:3000", "proto": "tcp"}],
    ],
    ids=["listed", "in a range"],
)
def test_a_port_that_firewall_allowed_inbound_admits_passes(allowed):
    run = check(ansible_port=2222, firewall_ssh_ports=[22], firewall_allowed_inbound=allowed)
    assert run.returncode == 0, run.output


def test_udp_does_not_carry_ssh():
    allowed = [{"port": "2222", "proto": "udp"}]
    run = check(ansible_port=2222, firewall_ssh_ports=[22], firewall_allowed_inbound=allowed)
    assert run.returncode != 0, run.output


def test_a_disabled_firewall_is_not_judged():
    run = check(ansible_port=2222, firewall_ssh_ports=[22], firewall_enabled=False)
    assert run.returncode == 0, run.output
