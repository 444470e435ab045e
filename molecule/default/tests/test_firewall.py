"""ufw admits only SSH and Tailscale, containers' published ports included; fail2ban guards sshd."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from conftest import GPU_HOST, inspect


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


# ---- containers: ufw's rule holds for published ports too ------------------------------------

# The scenario's GPU host has no tailnet interface (the tailscale double makes none), so a peer
# on the tailnet is stood in for by a network namespace behind a veth pair whose host end is
# named as Tailscale names its interface.
TAILNET_ADDRESS = "100.100.0.1"
PEER_ADDRESS = "100.100.0.2"
PEER_NETNS = "comfyume-test-tailnet-peer"
PROBE = "comfyume-test-published"
# name: what `docker run -p` gets
PUBLISHED = {
    f"{PROBE}-default": "18080:8000",
    f"{PROBE}-wildcard": "0.0.0.0:18081:8000",
    f"{PROBE}-tailnet": f"{TAILNET_ADDRESS}:18082:8000",
}


def status(host, url: str, netns: str | None = None) -> str:
    """The HTTP status of url as seen from host (or a network namespace of it), or why none."""
    prefix = f"ip netns exec {netns} " if netns else ""
    out = host.run(f"{prefix}curl -s -o /dev/null -w '%{{http_code}}' --max-time 4 {url}")
    return out.stdout.strip() if out.rc == 0 else f"curl-exit-{out.rc}"


def gpu_host_addresses() -> list[str]:
    """Every address of the simulated GPU host on the scenario's networks (its "public" side)."""
    networks = json.loads(
        subprocess.run(
            ["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", GPU_HOST],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return [net["IPAddress"] for net in networks.values() if net.get("IPAddress")]


def remove_tailnet_peer(host) -> None:
    host.run(f"ip link del tailscale0; ip netns del {PEER_NETNS}")


@pytest.fixture(scope="module")
def tailnet_peer(gpu_host):
    remove_tailnet_peer(gpu_host)
    gpu_host.check_output(
        f"ip netns add {PEER_NETNS}"
        f" && ip link add tailscale0 type veth peer name ts-peer0 netns {PEER_NETNS}"
        f" && ip addr add {TAILNET_ADDRESS}/30 dev tailscale0 && ip link set tailscale0 up"
        f" && ip -n {PEER_NETNS} addr add {PEER_ADDRESS}/30 dev ts-peer0"
        f" && ip -n {PEER_NETNS} link set ts-peer0 up"
    )
    yield PEER_NETNS
    remove_tailnet_peer(gpu_host)


@pytest.fixture(scope="module")
def published(gpu_host, tailnet_peer):
    """Three HTTP servers in containers of the worker's image (the one image a GPU host surely
    has), published without an address, on 0.0.0.0 and on the tailnet address."""
    image = inspect(gpu_host, "worker-1")["Config"]["Image"]
    gpu_host.run(f"docker rm -f {' '.join(PUBLISHED)}")
    try:
        for name, port in PUBLISHED.items():
            gpu_host.check_output(
                f"docker run -d --name {name} --restart unless-stopped -p {port}"
                f" --entrypoint python3 {image} -m http.server 8000"
            )
        deadline = time.monotonic() + 60
        while status(gpu_host, "http://127.0.0.1:18081/") != "200":
            assert time.monotonic() < deadline, gpu_host.run(f"docker logs {PROBE}-wildcard")
            time.sleep(1)
        yield
    finally:
        gpu_host.run(f"docker rm -f {' '.join(PUBLISHED)}")


def test_a_port_published_without_an_address_listens_on_loopback_only(gpu_host, published):
    config = json.loads(gpu_host.file("/etc/docker/daemon.json").content_string)
    assert config["ip"] == "127.0.0.1"
    listening = gpu_host.check_output("ss -Htln 'sport = :18080' | awk '{ print $4 }'")
    assert listening.split() == ["127.0.0.1:18080"]


def test_published_ports_answer_on_the_host_itself(gpu_host, published):
    assert status(gpu_host, "http://127.0.0.1:18080/") == "200"
    assert status(gpu_host, "http://127.0.0.1:18081/") == "200"


def test_published_ports_do_not_answer_the_app_server(app_host, published):
    """The app server reaches the GPU host over the scenario's networks, which stand for the
    public side here: neither the default binding nor an explicit 0.0.0.0 answers there."""
    addresses = gpu_host_addresses()
    assert addresses
    for address in addresses:
        for port in (18080, 18081):
            assert status(app_host, f"http://{address}:{port}/").startswith("curl-exit-"), (
                f"{address}:{port} answered the app server"
            )


def test_published_ports_answer_the_tailnet_where_they_are_bound(gpu_host, published):
    assert status(gpu_host, f"http://{TAILNET_ADDRESS}:18081/", PEER_NETNS) == "200"
    assert status(gpu_host, f"http://{TAILNET_ADDRESS}:18082/", PEER_NETNS) == "200"
    # Published without an address: loopback only, so not on the tailnet either.
    assert status(gpu_host, f"http://{TAILNET_ADDRESS}:18080/", PEER_NETNS).startswith("curl-")


def test_ufw_loads_the_docker_user_rules_that_are_in_force(gpu_host):
    """What is in force now is what ufw loads at boot and at every reload."""
    after = gpu_host.file("/etc/ufw/after.rules").content_string
    block = re.search(r"^# BEGIN comfyume firewall: DOCKER-USER.*?$(.*?)^# END", after, re.M | re.S)
    assert block, after

    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("-A DOCKER-USER ")]

    assert rules(gpu_host.check_output("iptables -S DOCKER-USER")) == rules(block[1])
    assert "-A DOCKER-USER -m conntrack --ctstate DNAT -j DROP" in rules(block[1])
    assert gpu_host.check_output("iptables -S FORWARD").splitlines()[1] == (
        "-A FORWARD -j DOCKER-USER"
    )


def test_the_rules_hold_after_ufw_reloads_and_docker_restarts(gpu_host, app_host, published):
    before = gpu_host.check_output("iptables -S DOCKER-USER")
    gpu_host.check_output("ufw reload")
    assert gpu_host.check_output("iptables -S DOCKER-USER") == before
    gpu_host.check_output("systemctl restart docker")
    try:
        assert gpu_host.check_output("iptables -S DOCKER-USER") == before
        deadline = time.monotonic() + 60
        while status(gpu_host, "http://127.0.0.1:18081/") != "200":
            assert time.monotonic() < deadline, "the published container did not come back"
            time.sleep(1)
        for address in gpu_host_addresses():
            assert status(app_host, f"http://{address}:18081/").startswith("curl-exit-")
        assert status(gpu_host, f"http://{TAILNET_ADDRESS}:18081/", PEER_NETNS) == "200"
    finally:
        # The workers come back with Docker (restart: unless-stopped); later tests need them.
        for name in ("worker-1", "worker-2"):
            wait_healthy(gpu_host, name)


def wait_healthy(host, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = host.run(f"docker inspect --format '{{{{.State.Health.Status}}}}' {name}")
        if state.stdout.strip() == "healthy":
            return
        time.sleep(2)
    raise AssertionError(f"{name} did not become healthy within {timeout:g} s")
