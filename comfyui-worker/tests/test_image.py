"""The container image: builds on a local base and runs healthy (tests/image_smoke.sh)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from worker_testlib import HERE

pytestmark = pytest.mark.docker


def test_image_builds_and_runs_healthy() -> None:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    done = subprocess.run(
        ["bash", str(HERE / "image_smoke.sh")], capture_output=True, text=True, timeout=1200
    )
    if done.returncode == 77:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr
