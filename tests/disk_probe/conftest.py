"""The disk_probe module, and loop devices that are detached after each test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from disk_helpers import have_tools, load_module


@pytest.fixture(scope="session")
def dp():
    return load_module()


@pytest.fixture
def loop():
    """attach(image, partscan=False) -> /dev/loopN; every device is detached at teardown.

    Needs root and losetup; the test is skipped where either is missing. Only devices made
    here are ever touched.
    """
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    missing = have_tools("losetup", "blkid", "wipefs", "mkfs.ext4")
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    attached: list[str] = []

    def attach(image: Path, partscan: bool = False) -> str:
        argv = ["losetup", "--find", "--show", *(["--partscan"] if partscan else []), str(image)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot attach a loop device: {proc.stderr.strip()}")
        device = proc.stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in reversed(attached):
        subprocess.run(["partx", "--delete", device], capture_output=True, check=False)
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
