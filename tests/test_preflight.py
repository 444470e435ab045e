"""playbooks/preflight.yml refuses every input a role or the worker would refuse, before any role
runs, naming the variable: each role's argument spec, the ranges and shapes a spec cannot
express, the timeouts' rules, and the worker's own configuration check (comfyui-worker/config.py)
on the .env rendered for each host. The preflight runs for real, on the controller only, against
a copy of the simulated hosts' inventory (their addresses given, as Docker would give them)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from localplay import BIN, REPO, Run, ansible_env, run, venv_path

PREFLIGHT = REPO / "playbooks" / "preflight.yml"
TIMEOUTS = yaml.safe_load((REPO / "playbooks/group_vars/all/timeouts.yml").read_text())[
    "comfyume_timeouts"
]
# The simulated app server's addresses, which the local inventory reads from Docker.
SIM_ADDRESSES = {
    "comfyume_app_server_address": "172.30.0.2",
    "comfyume_app_server_tailnet_address": "172.31.0.2",
}


@pytest.fixture
def inventories(tmp_path: Path) -> Path:
    copy = tmp_path / "inventories"
    shutil.copytree(REPO / "inventories", copy, ignore=shutil.ignore_patterns("vault.yml"))
    return copy


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The simulated hosts' generated secrets, made on first use."""
    return tmp_path / "sim-state"


def preflight(inventory: Path, state: Path, extra: dict | None = None, *args: str) -> Run:
    """The preflight's run; its `flat` output has Ansible's YAML line wrapping undone."""
    env = ansible_env(ANSIBLE_LOCALHOST_WARNING="0", PATH=venv_path())
    variables = {"comfyume_sim_state_dir": str(state), **SIM_ADDRESSES, **(extra or {})}
    command = [BIN / "ansible-playbook", "-i", inventory, PREFLIGHT]
    return run([*command, "-e", json.dumps(variables), *args], env, 300, cwd=REPO)


def secrets_of(state: Path) -> list[str]:
    return [p.read_text().split()[0] for p in state.iterdir()] if state.exists() else []


def timeouts(**changes: object) -> dict:
    return {"comfyume_timeouts": {**TIMEOUTS, **changes}}


# ---- the simulated hosts' own settings pass -----------------------------------------------


@pytest.mark.parametrize("source", ["local/hosts.yml", "local/fleet.yml"])
def test_the_simulated_hosts_settings_pass(inventories, state, source):
    run = preflight(inventories / source, state)
    assert run.returncode == 0, run.output
    # The worker's own check ran on each host's rendered .env.
    assert "Run the worker's configuration check on the controller" in run.output
    assert "changed=0" in run.output and "changed=1" not in run.output
    for secret in secrets_of(state):
        assert secret not in run.output


# ---- bad input is refused before anything changes, naming the variable --------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            {"worker_count": -1},
            ["worker_count must be a whole number of at least 0, got -1"],
            id="negative worker_count",
        ),
        pytest.param(
            {"worker_redis_host": ["10.0.0.1", "10.0.0.2"]},
            ["worker_redis_host must be one host name or address", '["10.0.0.1", "10.0.0.2"]'],
            id="a list as the Redis host",
        ),
        pytest.param(
            {"comfyume_redis_host": ""},
            ['worker_redis_host must be one host name or address (a non-empty string), got ""'],
            id="an empty Redis host",
        ),
        pytest.param(
            {"comfyume_redis_port": 70000},
            ["worker_redis_port must be a whole number from 1 to 65535, got 70000"],
            id="port 70000",
        ),
        pytest.param(
            timeouts(job=-5),
            ["worker_timeouts.job must be a whole number of seconds above 0, got -5"],
            id="a negative timeout",
        ),
        pytest.param(
            timeouts(heartbeat_ttl="sixty"),
            ['worker_timeouts.heartbeat_ttl must be a whole number of seconds above 0, got "six'],
            id="a string timeout",
        ),
        pytest.param(
            timeouts(heartbeat_interval=40),
            [
                "HEARTBEAT_INTERVAL (40) must be at most half of HEARTBEAT_TTL (60)",
                "HEARTBEAT_INTERVAL is worker_timeouts.heartbeat_interval",
                "comfyume_timeouts",
            ],
            id="heartbeat_interval above heartbeat_ttl / 2 (the worker's rule)",
        ),
        pytest.param(
            timeouts(job=600),
            [
                "WORKER_JOB_TIMEOUT (600) must be >= COMFYUI_TIMEOUT (900)",
                "WORKER_JOB_TIMEOUT is worker_timeouts.job",
            ],
            id="a job shorter than its ComfyUI call",
        ),
        pytest.param(
            timeouts(healthcheck_start_period=60),
            ["worker_timeouts.healthcheck_start_period (60 s) must cover worker_timeouts.model"],
            id="a start period shorter than the model load",
        ),
        pytest.param(
            {"storage_sfs_nconnect": "many"},
            ["storage role", "storage_sfs_nconnect", "int"],
            id="a type the storage role's spec refuses",
        ),
        pytest.param(
            {"firewall_default_incoming": "allow"},
            ["firewall role", "firewall_default_incoming", "deny, reject"],
            id="a choice the firewall role's spec refuses",
        ),
        pytest.param(
            {"firewall_ssh_ports": ["22:24"]},
            ["firewall role", "firewall_ssh_ports", "int"],
            id="a range where the firewall takes SSH ports",
        ),
        pytest.param(
            {"firewall_ssh_ports": [0]},
            ['firewall_ssh_ports: port "0" must be a port from 1 to 65535'],
            id="SSH port 0",
        ),
        pytest.param(
            {"firewall_ssh_connection_port": 70000},
            ["firewall_ssh_connection_port must be a whole number from 0 to 65535, got 70000"],
            id="a connection port beyond 65535",
        ),
        pytest.param(
            {"firewall_docker_allowed_interfaces": ["tailscale0", "eth0 -j ACCEPT"]},
            ['firewall_docker_allowed_interfaces: "eth0 -j ACCEPT" must be an interface name'],
            id="iptables words where the firewall takes an interface",
        ),
        pytest.param(
            {"firewall_docker_bridges": ["a-bridge-name-too-long"]},
            ['firewall_docker_bridges: "a-bridge-name-too-long" must be an interface name'],
            id="an interface name longer than 15 characters",
        ),
        pytest.param(
            {"docker_default_bind_address": "localhost"},
            ["docker_default_bind_address must be empty or one IP address", '"localhost"'],
            id="a host name where Docker takes an address to bind",
        ),
        pytest.param(
            {"project_data_links": {"inputs": "relative/path"}},
            ["project_data_links must map plain names to absolute paths"],
            id="a relative link target",
        ),
        pytest.param(
            {
                "project_data_links": {
                    "models": "/mnt/sfs/models",
                    "outputs": "/home/dev/comfyume/data/",
                }
            },
            [
                "project_data_links would put a link in /home/dev/comfyume/data that leads back"
                " into it: outputs: /home/dev/comfyume/data/ (data/ itself)",
                "The project role changed nothing",
            ],
            id="a data link to data/ itself",
        ),
        pytest.param(
            {"project_data_links": {"all": "/home/dev"}},
            ["all: /home/dev (a folder that holds data/)"],
            id="a data link to a folder that holds data/",
        ),
        pytest.param(
            {"comfyume_exchange_port": 0},
            ["appserver_exchange_port must be a whole number from 1 to 65535, got 0"],
            id="port 0 for the exchange",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_changes(inventories, state, extra, expected):
    run = preflight(inventories / "local" / "hosts.yml", state, extra)
    assert run.returncode != 0, run.output
    for text in expected:
        assert text in run.flat, run.output[-3000:]
    assert "changed=0" in run.output and "changed=1" not in run.output
    assert "\x1b" not in run.output
    for secret in secrets_of(state):
        assert secret not in run.output


def test_the_app_servers_settings_are_refused_before_anything_changes(inventories, state):
    run = preflight(
        inventories / "local" / "hosts.yml",
        state,
        {"appserver_exchange_port": 70000, "appserver_exchange_listen_address": "0.0.0.0"},
    )
    assert run.returncode != 0, run.output
    assert "appserver_exchange_port must be a whole number from 1 to 65535, got 70000" in run.flat
    assert "appserver_exchange_listen_address must be one IP address" in run.flat


def test_secrets_never_reach_the_output_even_where_a_value_is_quoted(inventories, state):
    password = "hunter2 hunter2"
    run = preflight(
        inventories / "local" / "hosts.yml",
        state,
        {"comfyume_redis_password": password, "comfyume_redis_host": password},
    )
    assert run.returncode != 0
    assert 'worker_redis_host must be one host name or address (a non-empty string), got "***"' in (
        run.flat
    )
    assert "hunter2" not in run.output


def test_a_scratch_device_that_is_not_there_is_refused(tmp_path, state):
    """The one check that reads a host: here the controller itself (a local connection)."""
    inventory = tmp_path / "hosts.yml"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory.write_text(
        yaml.safe_dump({"all": {"children": {"gpu_workers": {"hosts": {"here": host}}}}})
    )
    for device, why in [("/dev/comfyume-no-such-disk", "does not exist"), ("/dev/null", "is not")]:
        run = preflight(inventory, state, {"storage_scratch_device": device}, "--tags", "storage")
        assert run.returncode != 0, run.output
        assert f"storage_scratch_device: {device} {why}" in run.flat


# ---- the worker's own rules, not a second set ---------------------------------------------


def test_the_worker_rules_are_not_repeated_in_the_play():
    """CONTRACTS §4's rules between the worker's own timeouts live in comfyui-worker/config.py;
    timeouts.yml keeps only those of the healthcheck and nginx."""
    text = (REPO / "roles/worker/tasks/timeouts.yml").read_text()
    for rule in ("t.heartbeat_interval", "t.job >=", "t.queue_manager_stale_job"):
        assert rule not in text
