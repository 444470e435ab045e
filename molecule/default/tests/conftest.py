"""Shared helpers for the default scenario's verify step.

testinfra reaches the simulated hosts through docker exec. Some checks must run the
real playbooks again (check mode, data safety, bad input): `run_playbook` does that
against the same hosts through the repository's local inventory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import testinfra
import yaml

# The scenarios' shared helpers, and scripts/submit_job.py, which queues jobs the way the
# platform does.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import simlib
from simlib import REPO, PlaybookRun, inspect, recap  # noqa: F401

INVENTORY = REPO / "inventories" / "local" / "hosts.yml"
GPU_HOST = "verda-sim"
APP_HOST = "app-server"


def run_playbook(
    playbook: str | Path, *args: str, timeout: int = 900, env: dict | None = None
) -> PlaybookRun:
    """Run ansible-playbook against the default scenario's hosts."""
    return simlib.run_playbook(INVENTORY, playbook, *args, timeout=timeout, env=env)


# The one set of timeouts (group_vars), as the tests expect to find them deployed.
TIMEOUTS = yaml.safe_load((REPO / "playbooks/group_vars/all/timeouts.yml").read_text())[
    "comfyume_timeouts"
]

ROLE_PLAYBOOK = REPO / "molecule" / "default" / "tests" / "playbooks" / "role.yml"


def apply_role(role: str, **variables: object) -> PlaybookRun:
    """Apply one role to the simulated GPU host with these variables (typed, as JSON)."""
    return run_playbook(ROLE_PLAYBOOK, "-e", json.dumps({"test_role": role, **variables}))


@pytest.fixture(scope="session")
def gpu_host():
    return testinfra.get_host(f"docker://{GPU_HOST}")


@pytest.fixture(scope="session")
def app_host():
    return testinfra.get_host(f"docker://{APP_HOST}")


@pytest.fixture(scope="session")
def sim_state_dir() -> Path:
    return simlib.STATE_DIR


@pytest.fixture(scope="session")
def redis_password() -> str:
    return simlib.redis_password()


@pytest.fixture(scope="session")
def redis_client():
    return simlib.redis_client(APP_HOST)
