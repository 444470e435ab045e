"""probe() on real block devices: loop devices over image files, made and removed per test.

These need root (losetup); they are skipped without it. They never touch a device they did
not attach.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from disk_helpers import (
    MIB,
    ext4_behind_erased_gpt,
    populated_dir,
    run,
    sh,
    sha256,
    sparse_image,
    write_at,
    write_gpt,
)

SIZE = 64 * MIB


def probe(dp, device: str, **kwargs) -> dict:
    return dp.probe(device, run, **kwargs)


def test_a_fresh_volume_is_blank(dp, loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    facts = probe(dp, device)
    assert facts["blank"] is True, facts["reasons"]
    assert facts["reasons"] == []
    assert facts["block_device"] and facts["exclusive_open"]
    assert facts["size_bytes"] == SIZE
    assert facts["signature"] == {} and facts["partitions"] == [] and facts["holders"] == []
    assert len(facts["regions"]) == 11 and facts["nonzero_regions"] == []


def test_a_tar_archive_on_the_raw_device_is_not_blank(dp, loop, tmp_path):
    """The first incident: `tar -cf /dev/vdX` leaves no signature for blkid to find."""
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    populated_dir(tmp_path)
    sh("tar", "-cf", device, "-C", str(tmp_path), "outputs")
    facts = probe(dp, device)
    assert facts["signature"] == {}
    assert facts["partitions"] == [] and facts["holders"] == [] and facts["exclusive_open"]
    assert facts["blank"] is False
    assert facts["nonzero_regions"][0]["place"] == "first"
    assert len(facts["reasons"]) == 1
    assert facts["reasons"][0].startswith("non-zero data in the first 1 MiB (from byte 0)")


def test_ext4_behind_an_erased_gpt_is_not_blank_and_is_named(dp, loop, tmp_path):
    """The second incident: a GPT erased with `wipefs -a`, its ext4 partition intact at 1 MiB."""
    image = tmp_path / "disk.img"
    ext4_behind_erased_gpt(image, SIZE, populated_dir(tmp_path))
    device = loop(image)
    facts = probe(dp, device)
    assert facts["signature"] == {}
    assert facts["partitions"] == []
    assert facts["blank"] is False
    assert {"first", "second", "last"} <= {r["place"] for r in facts["nonzero_regions"]}
    [hidden] = facts["hidden_signatures"]
    assert hidden["offset"] == MIB and hidden["signature"]["TYPE"] == "ext4"
    text = " ".join(facts["reasons"])
    assert "a filesystem (ext4) at byte offset 1048576 (1 MiB)" in text
    assert "non-zero data in the first 1 MiB" in text


def test_the_probe_changes_nothing(dp, loop, tmp_path):
    image = tmp_path / "disk.img"
    ext4_behind_erased_gpt(image, SIZE, populated_dir(tmp_path))
    before = sha256(image)
    device = loop(image)
    probe(dp, device)
    probe(dp, device)
    assert sha256(device) == before
    subprocess.run(["losetup", "--detach", device], check=True)
    assert sha256(image) == before


def test_a_gpt_is_a_partition_table(dp, loop, tmp_path):
    image = sparse_image(tmp_path / "disk.img", SIZE)
    write_gpt(image, SIZE)
    facts = probe(dp, loop(image))
    assert facts["signature"]["PTTYPE"] == "gpt"
    assert {"source": "blkid", "table": "gpt", "uuid": facts["signature"]["PTUUID"]} in facts[
        "partitions"
    ]
    assert facts["blank"] is False
    assert any(r.startswith("partitions: ") for r in facts["reasons"])


def kernel_partition(device: str) -> str:
    """The first partition the kernel lists for ``device``, adding it with partx if the
    kernel did not scan the table itself (some kernels have no partition parsers)."""
    name = Path(device).name
    sysdir = Path("/sys/class/block") / name
    found = sorted(p.name for p in sysdir.iterdir() if (p / "partition").exists())
    if not found:
        proc = subprocess.run(["partx", "--add", device], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot add kernel partitions: {proc.stderr.strip()}")
        found = sorted(p.name for p in sysdir.iterdir() if (p / "partition").exists())
    if not found:
        pytest.skip("the kernel lists no partition of the loop device")
    return found[0]


def test_kernel_partitions_count_without_a_table(dp, loop, tmp_path):
    """Partitions the kernel still lists after their table's magic is gone."""
    image = sparse_image(tmp_path / "disk.img", SIZE)
    write_gpt(image, SIZE)
    device = loop(image, partscan=True)
    part = kernel_partition(device)
    # Erase the GPT's and the PMBR's magic without asking the kernel to re-read.
    write_at(device, 510, b"\0\0")
    write_at(device, 512, bytes(8))
    write_at(device, SIZE - 512, bytes(8))
    facts = probe(dp, device)
    assert facts["signature"] == {}
    assert [(p["source"], p["name"], p["start_sector"]) for p in facts["partitions"]] == [
        ("kernel", part, 2048)
    ]
    assert f"partitions: {part} (kernel)" in facts["reasons"]


def test_a_device_held_exclusively_is_in_use(dp, loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    try:
        facts = probe(dp, device)
    finally:
        os.close(fd)
    assert facts["exclusive_open"] is False
    assert facts["exclusive_open_error"].startswith("EBUSY")
    assert facts["blank"] is False
    assert facts["reasons"][0].startswith("in use: an exclusive open failed (EBUSY")
    assert probe(dp, device)["blank"] is True  # released: blank again


def test_a_mounted_filesystem_is_a_signature_in_use(dp, loop, tmp_path):
    image = sparse_image(tmp_path / "disk.img", SIZE)
    sh("mkfs.ext4", "-q", "-F", str(image))
    device = loop(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "ro", device, str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount here")
    try:
        facts = probe(dp, device)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert facts["signature"]["TYPE"] == "ext4"
    assert facts["signature"]["USAGE"] == "filesystem"
    assert facts["exclusive_open"] is False
    assert facts["hidden_signatures"] == []


def test_swap_is_a_signature(dp, loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    sh("mkswap", "--label", "notafs", device)
    facts = probe(dp, device)
    assert facts["signature"]["TYPE"] == "swap"
    assert facts["signature"].get("USAGE") != "filesystem"
    assert any(r.startswith("a signature: ") and "TYPE=swap" in r for r in facts["reasons"])


def fake_sysfs(root: Path, device: str, layout: dict) -> Path:
    """A sysfs tree whose /dev/block/MAJ:MIN entry for ``device`` has the given partitions
    (name -> holders) and holders (under the key "")."""
    rdev = os.stat(device).st_rdev
    disk = root / "devices" / "virtual" / "block" / Path(device).name
    (disk / "holders").mkdir(parents=True)
    for number, (part, names) in enumerate(layout.items()):
        place = disk if part == "" else disk / part
        if part:
            (place / "holders").mkdir(parents=True)
            (place / "partition").write_text(f"{number}\n")
            (place / "start").write_text("2048\n")
            (place / "size").write_text("100\n")
        for name in names:
            (place / "holders" / name).mkdir()
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}").symlink_to(disk)
    return root


def test_holders_of_the_disk_and_of_its_partitions(dp, loop, tmp_path):
    """No device-mapper or md here to build a real holder: sysfs is given as a fake tree."""
    device = loop(sparse_image(tmp_path / "disk.img", SIZE))
    name = Path(device).name
    sysfs = fake_sysfs(tmp_path / "sys", device, {"": ["dm-0"], f"{name}p1": ["md127"]})
    facts = dp.probe(device, run, sysfs=str(sysfs))
    assert facts["holders"] == ["dm-0", f"md127 (on {name}p1)"]
    assert facts["partitions"][0]["name"] == f"{name}p1"
    assert any(r.startswith("devices built on it (sysfs holders): dm-0") for r in facts["reasons"])
    assert facts["blank"] is False


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: str(tmp / "no-such-device"), "missing"),
        (lambda tmp: str(sparse_image(tmp / "disk.img", SIZE)), "regular file"),
        (lambda tmp: str(tmp), "directory"),
        (lambda tmp: "/dev/null", "character device"),
    ],
    ids=["missing", "regular file", "directory", "character device"],
)
def test_a_path_that_is_not_a_block_device_is_reported_not_blank(dp, tmp_path, make, kind):
    path = make(tmp_path)
    facts = dp.probe(path, run)
    assert facts["kind"] == kind
    assert facts["block_device"] is False
    assert facts["exists"] is (kind != "missing")
    assert facts["blank"] is False
    expected = "does not exist" if kind == "missing" else f"is a {kind}, not a block device"
    assert facts["reasons"] == [f"{path} {expected}"]
    assert facts["regions"] == [] and facts["signature"] == {}
