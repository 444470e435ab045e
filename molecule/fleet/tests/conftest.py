"""Shared helpers for the fleet scenario's verify step (three GPU hosts, one app server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resources"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import simlib
from simlib import REPO, PlaybookRun

INVENTORY = REPO / "inventories" / "local" / "fleet.yml"
GPU_HOSTS = ("fleet-gpu-1", "fleet-gpu-2", "fleet-gpu-3")
APP_HOST = "fleet-app"


def run_playbook(playbook: str | Path, *args: str, timeout: int = 900) -> PlaybookRun:
    """Run ansible-playbook against the fleet, results as JSON so no message is folded."""
    return simlib.run_playbook(
        INVENTORY,
        playbook,
        *args,
        timeout=timeout,
        env={"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"},
    )


@pytest.fixture(scope="session")
def hosts():
    return {name: testinfra.get_host(f"docker://{name}") for name in GPU_HOSTS}


@pytest.fixture(scope="session")
def redis_client():
    return simlib.redis_client(APP_HOST)
