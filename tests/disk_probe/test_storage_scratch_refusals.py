"""The storage role refuses a scratch device that is not blank, naming it and what it holds,
and changes nothing: the role runs here through ansible-playbook on localhost, against loop
devices made for the test. Only refusals (and a check-mode run) are exercised here, since a
converge that formats also mounts and writes /etc/fstab; molecule covers that path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from disk_helpers import MIB, ext4_behind_erased_gpt, populated_dir, sh, sha256, sparse_image
from localplay import Run, run_local_playbook

SIZE = 64 * MIB
FSTAB = Path("/etc/fstab")


@pytest.fixture(autouse=True)
def undo_a_format(tmp_path):
    """A broken probe lets the role format, mount and write fstab: undo that here, so a
    failing run leaves this machine as it found it."""
    fstab = FSTAB.read_bytes() if FSTAB.exists() else None
    yield
    put_back(tmp_path, fstab)


def put_back(tmp_path: Path, fstab: bytes | None) -> None:
    """Unmount everything mounted under tmp_path, deepest first, and put /etc/fstab back."""
    mounts = subprocess.run(
        ["findmnt", "--raw", "--noheadings", "--output", "TARGET"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for target in sorted((m for m in mounts if m.startswith(str(tmp_path))), reverse=True):
        subprocess.run(["umount", target], check=False)
    if fstab is not None and FSTAB.read_bytes() != fstab:
        FSTAB.write_bytes(fstab)


def run_role(workdir: Path, variables: dict, *args: str) -> Run:
    play = {
        "name": "Apply the storage role to a test device",
        "hosts": "localhost",
        "gather_facts": False,
        "roles": [{"role": "storage"}],
    }
    base = {
        "storage_sfs_enabled": False,
        "storage_scratch_mount_point": str(workdir / "mnt"),
        "storage_scratch_owner": "root",
        "storage_scratch_group": "root",
    }
    return run_local_playbook(workdir, [play], {**base, **variables}, *args, timeout=300)


def tar_device(loop, tmp_path: Path) -> str:
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    populated_dir(tmp_path)
    sh("tar", "-cf", device, "-C", str(tmp_path), "outputs")
    return device


def test_a_tar_archive_is_refused_untouched(loop, tmp_path):
    device = tar_device(loop, tmp_path)
    before = sha256(device)
    proc = run_role(tmp_path / "run", {"storage_scratch_device": device})
    out = proc.flat
    assert proc.returncode != 0, out
    assert f"{device} carries no filesystem but is not blank" in out
    assert "non-zero data in the first 1 MiB (from byte 0)" in out
    assert "Nothing was formatted" in out
    assert "storage_scratch_wipe_nonblank=true" in out
    assert sha256(device) == before
    assert not (tmp_path / "run" / "mnt").exists()


def test_ext4_behind_an_erased_gpt_is_refused_naming_the_filesystem(loop, tmp_path):
    image = tmp_path / "disk.img"
    ext4_behind_erased_gpt(image, SIZE, populated_dir(tmp_path))
    device = loop(image)
    before = sha256(device)
    proc = run_role(tmp_path / "run", {"storage_scratch_device": device})
    out = proc.flat
    assert proc.returncode != 0, out
    assert f"{device} carries no filesystem but is not blank" in out
    assert "a filesystem (ext4) at byte offset 1048576 (1 MiB)" in out
    assert "Nothing was formatted" in out
    assert sha256(device) == before


def test_a_missing_device_is_an_error_naming_the_variable(tmp_path):
    path = str(tmp_path / "vdz")
    proc = run_role(tmp_path / "run", {"storage_scratch_device": path})
    out = proc.flat
    assert proc.returncode != 0, out
    assert f"storage_scratch_device: {path} does not exist" in out
    assert not Path(path).exists()


def test_a_regular_file_is_an_error_naming_the_variable(tmp_path):
    image = sparse_image(tmp_path / "disk.img", SIZE)
    before = sha256(image)
    proc = run_role(tmp_path / "run", {"storage_scratch_device": str(image)})
    out = proc.flat
    assert proc.returncode != 0, out
    assert f"storage_scratch_device: {image} is a regular file, not a block device" in out
    assert sha256(image) == before


def test_a_device_in_use_is_refused_even_with_the_wipe_switch(loop, tmp_path):
    device = tar_device(loop, tmp_path)
    before = sha256(device)
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)  # stands in for a mount or a RAID member
    try:
        proc = run_role(
            tmp_path / "run",
            {"storage_scratch_device": device, "storage_scratch_wipe_nonblank": True},
        )
    finally:
        os.close(fd)
    out = proc.flat
    assert proc.returncode != 0, out
    assert "in use: an exclusive open failed (EBUSY" in out
    assert "which the role never wipes" in out
    assert sha256(device) == before


def test_a_swap_signature_is_refused_even_with_the_wipe_switch(loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    sh("mkswap", "--label", "notafs", device)
    before = sha256(device)
    proc = run_role(
        tmp_path / "run",
        {"storage_scratch_device": device, "storage_scratch_wipe_nonblank": True},
    )
    out = proc.flat
    assert proc.returncode != 0, out
    assert "carries a signature that is not a filesystem" in out
    assert "TYPE=swap" in out
    assert "Nothing was formatted" in out
    assert sha256(device) == before


def test_the_wipe_switch_in_check_mode_changes_nothing(loop, tmp_path):
    device = tar_device(loop, tmp_path)
    before = sha256(device)
    proc = run_role(
        tmp_path / "run",
        {"storage_scratch_device": device, "storage_scratch_wipe_nonblank": True},
        "--check",
    )
    out = proc.flat
    assert proc.returncode == 0, out
    assert "not blank" not in out
    assert sha256(device) == before
