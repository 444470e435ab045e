"""What site.yml leaves on a real GPU host, checked from the outside: the same state the
default scenario asserts on the simulated host, minus what only exists there (loop
devices, the bind-mounted share, the sentinel). Runs in every gpu-scenario verify; the
GPU-specific checks live in test_gpu.py."""

from __future__ import annotations

import json

import pytest

WORKER_ENV_TIMEOUTS = (
    "COMFYUI_TIMEOUT",
    "WORKER_JOB_TIMEOUT",
    "JOB_TIMEOUT",
    "QUEUE_MANAGER_TIMEOUT",
    "HEARTBEAT_TTL",
    "HEARTBEAT_INTERVAL",
)


def fstab(host) -> dict[str, list[str]]:
    """fstab entries by mount point."""
    entries = {}
    for line in host.file("/etc/fstab").content_string.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not fields[0].startswith("#"):
            entries[fields[1]] = fields
    return entries


def test_scratch_is_mounted_by_uuid(host):
    mount = host.mount_point("/mnt/scratch")
    assert mount.exists
    src, _, fstype, opts = fstab(host)["/mnt/scratch"][:4]
    assert src.startswith("UUID=")
    assert host.check_output("findmnt -n -o UUID /mnt/scratch") == src.removeprefix("UUID=")
    assert fstype == mount.filesystem
    assert "nofail" in opts.split(",")
    for name in ("outputs", "inputs", "temp"):
        assert host.file(f"/mnt/scratch/{name}").user == "dev"


def test_sfs_share_is_in_fstab_with_netdev_and_nofail(host):
    src, _, fstype, opts = fstab(host)["/mnt/sfs"][:4]
    assert fstype.startswith("nfs")
    assert {"_netdev", "nofail"} <= set(opts.split(","))
    if not host.mount_point("/mnt/sfs").exists:
        pytest.skip(f"SFS share {src} is not mounted (storage_sfs_required is false)")


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("models", "/mnt/sfs/models"),
        ("outputs", "/mnt/scratch/outputs"),
        ("inputs", "/mnt/scratch/inputs"),
    ],
)
def test_data_links(host, name, target):
    link = host.file(f"/home/dev/comfyume/data/{name}")
    assert link.is_symlink
    assert host.check_output(f"readlink {link.path}") == target


def test_dev_is_in_the_docker_group(host):
    assert "docker" in host.user("dev").groups


def test_docker_and_compose_answer(host):
    assert host.service("docker").is_running
    assert host.run("docker compose version --short").rc == 0


def test_firewall_admits_only_ssh_and_tailscale(host):
    """SSH on the ports sshd listens on; rules bound to an interface or an address may stay."""
    status = host.check_output("ufw status")
    assert "Status: active" in status
    sshd_ports = {
        line.split()[3].rsplit(":", 1)[1]
        for line in host.check_output("ss -Htlnp").splitlines()
        if '"sshd"' in line
    }
    from_anywhere = {
        line.split()[0]
        for line in status.splitlines()
        if line.split()[1:3] == ["ALLOW", "Anywhere"]
    }
    assert from_anywhere == {f"{port}/tcp" for port in sshd_ports} | {"41641/udp"}, status
    assert host.service("fail2ban").is_running


def test_containers_answer_only_on_loopback_and_the_tailnet(host):
    """Ports published without an address bind loopback; DOCKER-USER, which forwarded traffic
    meets first, drops new connections to containers unless they come from the tailnet."""
    assert json.loads(host.file("/etc/docker/daemon.json").content_string)["ip"] == "127.0.0.1"
    rules = host.check_output("iptables -S DOCKER-USER")
    assert "-A DOCKER-USER -i tailscale0 -j RETURN" in rules, rules
    assert "-A DOCKER-USER -m conntrack --ctstate DNAT -j DROP" in rules, rules
    forward = host.check_output("iptables -S FORWARD").splitlines()
    assert forward[1] == "-A FORWARD -j DOCKER-USER", forward


def test_tailscale_is_online(host):
    status = json.loads(host.check_output("tailscale status --json"))
    assert status["BackendState"] == "Running"


def test_workers_are_healthy_with_the_configured_timeouts(host):
    names = host.check_output(
        "docker ps --filter label=com.docker.compose.project=comfyui-worker --format '{{.Names}}'"
    ).split()
    assert names, "no worker containers"
    for name in names:
        info = json.loads(host.check_output(f"docker inspect {name}"))[0]
        assert info["State"]["Health"]["Status"] == "healthy", name
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        assert env["WORKER_ID"].endswith(name)
        for key in WORKER_ENV_TIMEOUTS:
            assert env[key].isdigit(), f"{name}: {key}={env.get(key)}"
