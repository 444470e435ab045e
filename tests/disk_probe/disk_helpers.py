"""The disk_probe module loaded as plain Python, and the disks the tests build.

A disk is a sparse image file; where a test needs a block device the image is attached to a
loop device (losetup) that the `loop` fixture detaches again. The layouts are made with the
real tools (tar, mkfs.ext4, wipefs), except the GPT, which is written here so that the tests
need nothing beyond util-linux and e2fsprogs.

Standard library only, and nothing else of tests/: molecule's test_playbook_runs.py copies this
file alone onto a simulated host and builds its disks there with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_PATH = REPO / "roles" / "storage" / "library" / "disk_probe.py"
MIB = 1024 * 1024
SECTOR = 512
LINUX_FILESYSTEM = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")


def load_module():
    spec = importlib.util.spec_from_file_location("disk_probe", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("disk_probe", module)
    spec.loader.exec_module(module)
    return module


def run(argv: list[str]) -> tuple[int, str, str]:
    """What AnsibleModule.run_command returns, for the module's functions."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def sparse_image(path: Path, size: int = 64 * MIB) -> Path:
    """A zero-filled image, as a freshly attached volume reads."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def write_at(path: Path | str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_gpt(path: Path | str, size: int, first_lba: int = 2048) -> None:
    """A GPT with one Linux partition from ``first_lba`` to the last usable sector, with
    its protective MBR and its backup, as sfdisk or parted would write it."""
    sectors = size // SECTOR
    last_usable = sectors - 34
    entries = bytearray(128 * 128)
    entries[:128] = struct.pack(
        "<16s16sQQQ72s",
        LINUX_FILESYSTEM.bytes_le,
        uuid.uuid4().bytes_le,
        first_lba,
        last_usable,
        0,
        "scratch".encode("utf-16-le"),
    )
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4().bytes_le

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        raw = bytearray(
            struct.pack(
                "<8sIIIIQQQQ16sQIII",
                b"EFI PART",
                0x00010000,
                92,
                0,
                0,
                current,
                backup,
                34,
                last_usable,
                disk_guid,
                entries_lba,
                128,
                128,
                entries_crc,
            )
        )
        raw[16:20] = struct.pack("<I", zlib.crc32(raw))
        return bytes(raw) + b"\0" * (SECTOR - len(raw))

    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(sectors - 1, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    write_at(path, 0, bytes(mbr) + header(1, sectors - 1, 2) + bytes(entries))
    write_at(path, (sectors - 33) * SECTOR, bytes(entries) + header(sectors - 1, 1, sectors - 33))


def populated_dir(root: Path) -> Path:
    """A directory of workshop outputs to put into archives and filesystems."""
    src = root / "outputs"
    (src / "alice").mkdir(parents=True, exist_ok=True)
    (src / "alice" / "result.txt").write_text("workshop output, must survive\n")
    (src / "alice" / "image.bin").write_bytes(os.urandom(300 * 1024))
    return src


def ext4_behind_erased_gpt(path: Path, size: int, content: Path) -> None:
    """The incident: a GPT with one ext4 partition at 1 MiB holding files, then `wipefs -a`
    on the whole disk, which erases the GPT's and the PMBR's magic and nothing else."""
    sparse_image(path, size)
    write_gpt(path, size)
    fs_kib = (size - 2 * MIB) // 1024
    sh("mkfs.ext4", "-q", "-F", "-E", f"offset={MIB}", "-d", str(content), str(path), f"{fs_kib}k")
    # On a whole disk `wipefs -a` is enough; an image file needs --force for the table.
    sh("wipefs", "--all", "--force", "--quiet", str(path))


def have_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]
