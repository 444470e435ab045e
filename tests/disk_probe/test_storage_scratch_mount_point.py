"""The storage role keeps one disk at the scratch mount point: when another disk is mounted
there than storage_scratch_device names, it stops, naming both, and unmounts nothing (the
mount module would only remount the old disk and rewrite fstab, so the next boot would bring
up another one). The same disk by another name (a link, as /dev/disk/by-id/... is) goes on.

The role runs here through ansible-playbook on localhost against two loop devices made for
the test, on /dev/loop3 or above (loop0-2 belong to the simulated hosts); the test formats and
mounts one of them at a folder of its own, and puts /etc/fstab back afterwards."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from disk_helpers import MIB, have_tools, sha256, sparse_image
from test_storage_scratch_refusals import FSTAB, put_back, run_role

SIZE = 64 * MIB
FIRST_LOOP = 3


@pytest.fixture
def loop_dev(tmp_path) -> Iterator[Callable[[str], str]]:
    """attach(name) -> /dev/loopN (N >= 3) on a blank image; at teardown every mount under
    tmp_path is unmounted, /etc/fstab put back and the devices detached."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    missing = have_tools("losetup", "blkid", "findmnt", "lsblk", "mkfs.ext4")
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    fstab = FSTAB.read_bytes() if FSTAB.exists() else None
    attached: list[str] = []

    def attach(name: str) -> str:
        image = sparse_image(tmp_path / f"{name}.img", SIZE)
        for n in range(FIRST_LOOP, 256):
            device = f"/dev/loop{n}"
            if not Path(device).exists():
                break
            proc = subprocess.run(["losetup", device, str(image)], capture_output=True, check=False)
            if proc.returncode == 0:
                attached.append(device)
                return device
        pytest.skip(f"no free loop device from /dev/loop{FIRST_LOOP} on")

    yield attach
    put_back(tmp_path, fstab)
    for device in reversed(attached):
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)


def mounted_source(mount_point: Path) -> str:
    return subprocess.run(
        ["findmnt", "--noheadings", "--output", "SOURCE", "--mountpoint", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def devno(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def test_another_disk_at_the_mount_point_is_refused_and_stays_mounted(loop_dev, tmp_path):
    a, b = loop_dev("a"), loop_dev("b")
    run, mnt = tmp_path / "run", tmp_path / "run" / "mnt"
    first = run_role(run, {"storage_scratch_device": a})
    assert first.returncode == 0, first.flat
    assert mounted_source(mnt) == a
    (mnt / "outputs" / "result.png").write_bytes(b"workshop output, must survive\n")
    fstab, b_before = FSTAB.read_bytes(), sha256(b)

    by_id = tmp_path / "by-id" / "virtio-scratch-b"  # as /dev/disk/by-id/... links to /dev/vdc
    by_id.parent.mkdir()
    by_id.symlink_to(b)
    for name, named, args in ((b, "", ()), (str(by_id), f"{b}, ", ("--check",))):
        proc = run_role(run, {"storage_scratch_device": name}, *args)
        out = proc.flat
        assert proc.returncode != 0, out
        assert f"{mnt} has {a} (ext4, device {devno(a)}, UUID " in out
        assert f"not storage_scratch_device {name} ({named}device {devno(b)})" in out
        assert "Nothing was unmounted, formatted or written to fstab" in out
        assert f"copy what you need off {a}, unmount {mnt}" in out
        assert mounted_source(mnt) == a
        assert (mnt / "outputs" / "result.png").read_bytes() == b"workshop output, must survive\n"
        assert FSTAB.read_bytes() == fstab
        assert sha256(b) == b_before  # not formatted


def test_the_mounted_disk_by_another_name_goes_on_unchanged(loop_dev, tmp_path):
    a = loop_dev("a")
    run, mnt = tmp_path / "run", tmp_path / "run" / "mnt"
    first = run_role(run, {"storage_scratch_device": a})
    assert first.returncode == 0, first.flat
    fstab = FSTAB.read_bytes()
    by_id = tmp_path / "by-id" / "virtio-scratch"  # as /dev/disk/by-id/... links to /dev/vdb
    by_id.parent.mkdir()
    by_id.symlink_to(a)
    proc = run_role(run, {"storage_scratch_device": str(by_id)})
    out = proc.flat
    assert proc.returncode == 0, out
    assert "changed=0" in out
    assert mounted_source(mnt) == a
    assert FSTAB.read_bytes() == fstab
