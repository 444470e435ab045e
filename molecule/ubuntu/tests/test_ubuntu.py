"""A fresh Ubuntu 22.04 host after docker, tailscale, firewall and project converged."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

# The scenarios' shared helpers: the simulated hosts' addresses, ansible-playbook runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources"))
import simlib
from simlib import REPO

DATA_LINKS = yaml.safe_load((REPO / "roles/project/defaults/main.yml").read_text())[
    "project_data_links"
]
# sshd listens on this port only (prepare.yml); it is the host's ansible_port (host_vars/).
SSH_PORT = 2222

# A container image made on the host from its own echo and libc (no registry here), run
# through docker compose without a network.
COMPOSE_RUN = r"""
set -e
dir=$(mktemp -d)
tar -C / -ch usr/bin/echo lib64/ld-linux-x86-64.so.2 lib/x86_64-linux-gnu/libc.so.6 \
  | docker import - comfyume-echo:latest >/dev/null
cat > "$dir/compose.yml" <<'YAML'
services:
  probe:
    image: comfyume-echo:latest
    network_mode: none
    command: ["/usr/bin/echo", "compose ran a service"]
YAML
docker compose -f "$dir/compose.yml" -p comfyume-probe run --rm probe
docker compose -f "$dir/compose.yml" -p comfyume-probe down --rmi all >/dev/null 2>&1
rm -rf "$dir"
"""


def test_the_host_is_ubuntu_22_04(host):
    assert host.system_info.distribution == "ubuntu"
    assert host.system_info.release == "22.04"


def test_docker_came_from_ubuntus_packages(host):
    """No engine was there, so the role installed docker.io and docker-compose-v2."""
    assert host.package("docker.io").is_installed
    assert host.package("docker-compose-v2").is_installed
    assert not host.package("docker-ce").is_installed


def test_engine_is_active_and_enabled(host):
    docker = host.service("docker")
    assert docker.is_running
    assert docker.is_enabled
    assert host.run("docker info --format '{{.ServerVersion}}'").rc == 0


def test_daemon_json_is_merged_not_replaced(host):
    """The host had data-root and a log option of its own (prepare.yml): both stay, the role's
    keys win where they overlap, and the previous file is kept beside it."""
    daemon = host.file("/etc/docker/daemon.json")
    assert (daemon.user, daemon.group, daemon.mode) == ("root", "root", 0o644)
    config = json.loads(daemon.content_string)
    assert config["data-root"] == "/var/lib/docker-data"
    assert config["log-driver"] == "json-file"
    assert config["log-opts"] == {"labels": "comfyume-site", "max-size": "50m", "max-file": "3"}
    assert "runtimes" not in config
    assert host.check_output("docker info --format '{{.DockerRootDir}}'") == "/var/lib/docker-data"
    backups = host.check_output("ls /etc/docker").split()
    assert [b for b in backups if b.startswith("daemon.json.") and b.endswith("~")], backups


def test_compose_v2_runs_a_service(host):
    out = host.run("bash -c %s", COMPOSE_RUN)
    assert out.rc == 0, out.stderr
    assert "compose ran a service" in out.stdout


def test_tailscale_joined(host):
    status = json.loads(host.check_output("tailscale status --json"))
    assert status["BackendState"] == "Running"
    assert status["Self"]["HostName"] == "ubuntu-sim"


def test_ufw_admits_only_ssh_and_tailscale(host):
    """SSH on the port sshd listens on; prepare's rules for 22/tcp (the SSH port of before) and
    8080/tcp (opened by hand) are gone."""
    verbose = host.check_output("ufw status verbose")
    assert "Status: active" in verbose
    assert "deny (incoming)" in verbose
    from_anywhere = {
        line.split()[0]
        for line in verbose.splitlines()
        if line.split()[1:4] == ["ALLOW", "IN", "Anywhere"]
    }
    assert from_anywhere == {f"{SSH_PORT}/tcp", "41641/udp"}, verbose
    added = host.check_output("ufw show added")
    assert "ufw allow 22/tcp" not in added
    assert "8080" not in added


def test_containers_answer_only_on_loopback_and_the_tailnet(host):
    """Ports published without an address bind loopback; DOCKER-USER drops the rest unless it
    comes from the tailnet, and ufw loads those rules at boot (after.rules, after6.rules)."""
    assert json.loads(host.file("/etc/docker/daemon.json").content_string)["ip"] == "127.0.0.1"
    for tool, rules_file in (("iptables", "after.rules"), ("ip6tables", "after6.rules")):
        rules = host.check_output(f"{tool} -S DOCKER-USER")
        assert "-A DOCKER-USER -i tailscale0 -j RETURN" in rules, rules
        assert "-A DOCKER-USER -m conntrack --ctstate DNAT -j DROP" in rules, rules
        loaded = host.file(f"/etc/ufw/{rules_file}").content_string
        assert "# BEGIN comfyume firewall: DOCKER-USER" in loaded


def test_ufw_keeps_the_rule_bound_to_an_interface(host):
    """prepare added it as the app server's exchange does: it is not the firewall role's."""
    added = host.check_output("ufw show added")
    assert "ufw allow in on tailscale0 to any port 8288 proto tcp" in added, added


def test_sshd_listens_on_its_port_only(host):
    listening = host.check_output("ss -Htlnp")
    ports = {
        line.split()[3].rsplit(":", 1)[1] for line in listening.splitlines() if '"sshd"' in line
    }
    assert ports == {str(SSH_PORT)}, listening


def test_ssh_answers_through_the_firewall(host):
    """From outside the host, through ufw: sshd's banner on the admitted port."""
    address = simlib.container_address(host.backend.name)
    with socket.create_connection((address, SSH_PORT), timeout=10) as conn:
        conn.settimeout(10)
        assert conn.recv(64).startswith(b"SSH-2.0-")


@pytest.fixture
def listener_on_8080(host):
    """Something listening on 8080, the port prepare opened by hand."""
    host.check_output(
        "systemd-run --unit comfyume-probe-8080 python3 -m http.server --bind 0.0.0.0 8080"
    )
    host.check_output("timeout 20 sh -c 'until ss -Htln | grep -q :8080; do sleep 0.2; done'")
    yield 8080
    host.run("systemctl stop comfyume-probe-8080; systemctl reset-failed comfyume-probe-8080")


def test_the_port_opened_by_hand_is_closed_to_the_outside(host, listener_on_8080):
    assert host.run(f"curl -fsS -o /dev/null http://127.0.0.1:{listener_on_8080}/").rc == 0
    address = simlib.container_address(host.backend.name)
    with pytest.raises(OSError):  # dropped by ufw: a timeout
        socket.create_connection((address, listener_on_8080), timeout=3).close()


def test_fail2ban_guards_sshd_on_its_port(host):
    assert host.service("fail2ban").is_running
    assert "Currently banned" in host.check_output("fail2ban-client status sshd")
    # fail2ban's own reading of its configuration: the sshd jail's actions block this port.
    assert f"['port', '{SSH_PORT}']" in host.check_output("fail2ban-client -d")


def test_a_play_that_connects_on_another_port_changes_nothing_in_ufw(host, tmp_path):
    """ansible_port 22 while sshd listens on 2222 only: enabling ufw as asked would lock the
    admin out, so the firewall play stops, naming the port and the variable, before ufw."""
    name = host.backend.name
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "gpu_workers": {
                            "hosts": {
                                name: {
                                    "ansible_connection": "community.docker.docker",
                                    "ansible_port": 22,
                                }
                            }
                        }
                    }
                }
            }
        )
    )
    before = host.check_output("ufw show added"), host.check_output("ufw status verbose")
    run = simlib.run_playbook(inventory, REPO / "playbooks" / "firewall.yml", timeout=600)
    flat = run.flat
    assert run.rc != 0, run.output[-3000:]
    assert f"ufw was left as it was on {name}, because it would cut off SSH" in flat
    assert "Ansible reaches sshd on port 22/tcp (ansible_port)" in flat
    assert f"ufw would admit SSH only on {SSH_PORT}/tcp (the ports sshd listens on)" in flat
    assert "Set ansible_port to the port sshd listens on" in flat
    assert "Install ufw and fail2ban" not in run.output
    assert (host.check_output("ufw show added"), host.check_output("ufw status verbose")) == before


def test_dev_is_in_the_docker_group(host):
    dev = host.user("dev")
    assert dev.exists
    assert "docker" in dev.groups


def test_data_links_point_at_the_volumes(host):
    """The role's own defaults; the targets dangle on this host, which has no volumes."""
    for name, target in DATA_LINKS.items():
        path = f"/home/dev/comfyume/data/{name}"
        assert host.file(path).is_symlink, path
        assert host.check_output("readlink %s", path) == target
        assert host.check_output("stat -c %%U:%%G %s", path) == "dev:dev"
