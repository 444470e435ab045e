"""A fresh Ubuntu 22.04 host after docker, tailscale, firewall and project converged."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DATA_LINKS = yaml.safe_load(
    (Path(__file__).resolve().parents[3] / "roles/project/defaults/main.yml").read_text()
)["project_data_links"]

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
    verbose = host.check_output("ufw status verbose")
    assert "Status: active" in verbose
    assert "deny (incoming)" in verbose
    rules = {line.split()[0] for line in verbose.splitlines() if "ALLOW IN" in line}
    assert rules == {"22/tcp", "41641/udp"}


def test_fail2ban_guards_sshd(host):
    assert host.service("fail2ban").is_running
    assert "Currently banned" in host.check_output("fail2ban-client status sshd")


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
