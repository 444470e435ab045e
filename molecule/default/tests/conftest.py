"""Shared helpers for the default scenario's verify step.

testinfra reaches the simulated hosts through docker exec. Some checks must run the
real playbooks again (check mode, data safety, bad input): `run_playbook` does that
against the same hosts through the repository's local inventory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra
import yaml

REPO = Path(__file__).resolve().parents[3]
# scripts/submit_job.py queues jobs the way the platform does; the tests use it too.
sys.path.insert(0, str(REPO / "scripts"))
INVENTORY = REPO / "inventories" / "local"
GPU_HOST = "verda-sim"
APP_HOST = "app-server"


@dataclass
class PlaybookRun:
    rc: int
    output: str


def run_playbook(playbook: str | Path, *args: str, timeout: int = 900) -> PlaybookRun:
    """Run ansible-playbook from the repository root against the simulated hosts."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
    )
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(INVENTORY), str(playbook), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


# The one set of timeouts (group_vars), as the tests expect to find them deployed.
TIMEOUTS = yaml.safe_load(
    (REPO / "inventories/production/group_vars/all/timeouts.yml").read_text()
)["comfyume_timeouts"]


def inspect(host, name: str) -> dict:
    """`docker inspect` of one container on a simulated host."""
    return json.loads(host.check_output(f"docker inspect {name}"))[0]


ROLE_PLAYBOOK = REPO / "molecule" / "default" / "tests" / "playbooks" / "role.yml"


def apply_role(role: str, **variables: object) -> PlaybookRun:
    """Apply one role to the simulated GPU host with these variables (typed, as JSON)."""
    return run_playbook(ROLE_PLAYBOOK, "-e", json.dumps({"test_role": role, **variables}))


RECAP_LINE = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>ok=\d+.*)$")


def recap(output: str) -> dict[str, dict[str, int]]:
    """Parse the PLAY RECAP lines into {host: {ok: n, changed: n, ...}}."""
    hosts: dict[str, dict[str, int]] = {}
    for line in output.splitlines():
        match = RECAP_LINE.match(line.strip())
        if match:
            counts = (item.split("=", 1) for item in match["counts"].split())
            hosts[match["host"]] = {k: int(v) for k, v in counts}
    return hosts


@pytest.fixture(scope="session")
def gpu_host():
    return testinfra.get_host(f"docker://{GPU_HOST}")


@pytest.fixture(scope="session")
def app_host():
    return testinfra.get_host(f"docker://{APP_HOST}")


@pytest.fixture(scope="session")
def sim_state_dir() -> Path:
    return Path(os.environ.get("COMFYUME_SIM_STATE", "/var/lib/comfyume-sim"))


@pytest.fixture(scope="session")
def redis_password(sim_state_dir: Path) -> str:
    return (sim_state_dir / "redis-password").read_text().split()[0]


@pytest.fixture(scope="session")
def redis_client(redis_password):
    import redis

    address = subprocess.run(
        [
            "docker",
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            APP_HOST,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return redis.Redis(address, 6379, password=redis_password, socket_timeout=10)
