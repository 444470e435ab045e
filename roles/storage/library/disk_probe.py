#!/usr/bin/python
# Copyright: comfyume GPU host project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module disk_probe: tell whether a block device is blank, read-only.

``blkid --probe`` finding no signature is not enough to call a disk blank: a tar archive
written to the raw device carries none, and neither does a disk whose GPT was erased with
``wipefs -a`` while the ext4 filesystem of its first partition still sits at 1 MiB. Both
were formatted once. A fresh cloud volume is all zeros, has no partitions, and nothing
uses it; this module checks exactly that and says what it found instead.

Every check is a plain function (a path, a sysfs directory, or a ``run`` callable in, facts
out) so the tests drive them with regular files, loop devices and fake sysfs trees. The file
is self-contained because Ansible ships it alone to the target, whose Python may be as old as
3.10 (Ubuntu 22.04's).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_probe
short_description: Tell whether a block device is blank, and what it holds if not
description:
  - Reads a block device and reports whether it is blank, the way a freshly attached cloud
    volume is, and every reason it is not. Nothing on the device or the host is changed; the
    module never reports C(changed) and runs the same in check mode.
  - "A device is blank when all of these hold: it exists and is a block device; C(blkid --probe)
    finds no signature on it (no filesystem, partition table, swap, LUKS, RAID or LVM member);
    the kernel lists no partitions of it (C(/sys/dev/block/MAJ:MIN/*/partition)); nothing is
    built on it (C(/sys/dev/block/MAJ:MIN/holders), its partitions' too); an exclusive open
    (C(O_EXCL)) succeeds, so it is not mounted, active swap or claimed by device-mapper or RAID;
    and the first and last O(region_bytes), the region at offset O(region_bytes) (where a first
    partition usually starts) and O(samples) regions spread evenly in between are all zeros."
  - Where data is found, C(blkid --probe --offset) also looks for a signature at each of
    O(hidden_offsets), so the report can name, for example, an ext4 filesystem at 1 MiB whose
    partition table was erased.
  - A path that does not exist or is not a block device is reported (RV(exists),
    RV(block_device), RV(reasons)), not failed, so that the caller can name its own variable.
version_added: "1.0.0"
author:
  - comfyume GPU host maintainers
options:
  device:
    description:
      - The device to probe, e.g. C(/dev/vdb); symbolic links (C(/dev/disk/by-id/...)) are
        followed.
    type: path
    required: true
  region_bytes:
    description:
      - Size of each region read for the zero check; the first and last regions are this long.
    type: int
    default: 1048576
  samples:
    description:
      - Regions read for the zero check between the second region and the last one, spread
        evenly.
    type: int
    default: 8
  hidden_offsets:
    description:
      - Byte offsets at which C(blkid) looks for a signature when the device holds data, i.e.
        where partitions start (1 MiB today, 63 sectors on old DOS tables).
    type: list
    elements: int
    default: [1048576, 32256]
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
notes:
  - Needs root (become) to open the device.
  - The zero check reads 3 + O(samples) regions, 11 MiB with the defaults, whatever the size of
    the device.
  - Data that lies only between the sampled regions is not seen; the signature, partition and
    zero checks together catch what a previous use of a disk leaves at its start and end.
requirements:
  - Python 3.10 or later on the target.
  - C(blkid) (util-linux) on the target.
"""

EXAMPLES = r"""
- name: Probe the scratch device
  disk_probe:
    device: /dev/vdb
  register: probe
  # ansible verda-h100 -b -m disk_probe -a device=/dev/vdb

- name: Stop unless it is blank
  ansible.builtin.assert:
    that: probe.blank
    fail_msg: "/dev/vdb is not blank: {{ probe.reasons | join('; ') }}"
"""

RETURN = r"""
device:
  description: The device probed, as given.
  returned: always
  type: str
  sample: /dev/vdb
exists:
  description: Whether the path exists.
  returned: always
  type: bool
block_device:
  description: Whether the path is a block device.
  returned: always
  type: bool
kind:
  description: What the path is (C(block device), C(regular file), C(directory), C(missing), ...).
  returned: always
  type: str
  sample: block device
blank:
  description: True when every check passed; RV(reasons) is then empty.
  returned: always
  type: bool
reasons:
  description: One sentence per failed check, saying what was found.
  returned: always
  type: list
  elements: str
  sample: ["non-zero data in the first MiB (from byte 512), in the last MiB (from byte 67091968)"]
size_bytes:
  description: Size of the device in bytes (0 when it is not a block device).
  returned: always
  type: int
signature:
  description:
    - What C(blkid --probe --output export) printed, without C(DEVNAME); empty when nothing
      was found.
  returned: always
  type: dict
  sample: {"TYPE": "ext4", "UUID": "0b1c...", "USAGE": "filesystem"}
partitions:
  description:
    - Partitions of the device, from the kernel (C(source=kernel), with C(name), C(number),
      C(start_sector) and C(sectors)) and from C(blkid)'s partition probing (C(source=blkid),
      with C(table) and C(uuid) of the partition table).
  returned: always
  type: list
  elements: dict
holders:
  description:
    - Devices built on this one or on its partitions (device-mapper, RAID), as C(NAME) or
      C(NAME (on PARTITION)).
  returned: always
  type: list
  elements: str
exclusive_open:
  description:
    - Whether an exclusive (C(O_EXCL)) open succeeded; RV(exclusive_open_error) says why not.
  returned: always
  type: bool
exclusive_open_error:
  description: The error of the exclusive open, empty when it succeeded.
  returned: always
  type: str
regions:
  description:
    - The regions read for the zero check, each with C(place) (C(first), C(second), C(sample)
      or C(last)), C(label), C(offset) and C(length) in bytes.
  returned: always
  type: list
  elements: dict
nonzero_regions:
  description:
    - The regions that hold non-zero bytes, as in RV(regions), each with C(first_nonzero) too
      (the absolute byte offset of its first non-zero byte).
  returned: always
  type: list
  elements: dict
hidden_signatures:
  description:
    - Signatures found by C(blkid --offset) at O(hidden_offsets), each with C(offset) and
      C(signature).
  returned: always
  type: list
  elements: dict
"""

import errno  # noqa: E402 - Ansible modules put imports after the documentation
import os  # noqa: E402
import stat  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

MIB = 1024 * 1024
SECTOR = 512


class ProbeError(Exception):
    """The probe itself could not run (no permission, blkid failing); not a finding."""


# ---- the path and its place in sysfs --------------------------------------------------------


def path_kind(path: str) -> str:
    """What the path is, following symbolic links: ``block device``, ``missing``, ..."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    for test, name in (
        (stat.S_ISBLK, "block device"),
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def sysfs_dir(path: str, sysfs: str = "/sys") -> str:
    """The device's directory in sysfs, found by its numbers (works for any name or link)."""
    rdev = os.stat(path).st_rdev
    return os.path.realpath(
        os.path.join(sysfs, "dev", "block", f"{os.major(rdev)}:{os.minor(rdev)}")
    )


def read_int(path: str) -> int:
    with open(path, encoding="ascii") as handle:
        return int(handle.read().strip())


def kernel_partitions(devdir: str) -> list:
    """Partitions the kernel knows of: the disk's sysfs subdirectories with a ``partition`` file."""
    found = []
    try:
        entries = sorted(os.listdir(devdir))
    except OSError:
        return found
    for name in entries:
        part = os.path.join(devdir, name)
        if not os.path.isfile(os.path.join(part, "partition")):
            continue
        entry = {
            "source": "kernel",
            "name": name,
            "number": read_int(os.path.join(part, "partition")),
        }
        for key, fname in (("start_sector", "start"), ("sectors", "size")):
            try:
                entry[key] = read_int(os.path.join(part, fname))
            except (OSError, ValueError):
                entry[key] = None
        found.append(entry)
    return found


def holders(devdir: str, partitions: list) -> list:
    """Devices built on the disk (``holders/``) or on one of its kernel partitions."""
    found = []
    places = [(devdir, "")] + [(os.path.join(devdir, p["name"]), p["name"]) for p in partitions]
    for place, part in places:
        try:
            names = sorted(os.listdir(os.path.join(place, "holders")))
        except OSError:
            continue
        found.extend(f"{name} (on {part})" if part else name for name in names)
    return found


def exclusive_open(path: str) -> tuple:
    """(True, "") when the device can be opened exclusively, else (False, the error).

    On Linux, O_EXCL without O_CREAT on a block device fails with EBUSY while the device
    (or one of its partitions) is mounted, active swap, or claimed by device-mapper or RAID.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return False, f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    os.close(fd)
    return True, ""


# ---- the zero check --------------------------------------------------------------------------


def human_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1024)):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def plan_regions(size: int, region: int = MIB, samples: int = 8) -> list:
    """The regions the zero check reads: the first and last ``region`` bytes, the region at
    ``region`` (a first partition's usual start) and ``samples`` regions spread evenly
    between, 4 KiB-aligned. Regions never extend past the end and none is read twice."""
    if size <= 0 or region <= 0:
        return []
    unit = human_bytes(region)
    wanted = [("first", f"the first {unit}", 0), ("second", f"the {unit} at {unit}", region)]
    for i in range(1, samples + 1):
        offset = (size * i // (samples + 1)) // 4096 * 4096
        wanted.append(("sample", f"the {unit} at byte {offset}", offset))
    wanted.append(("last", f"the last {unit}", max(0, size - region)))
    regions, seen = [], set()
    for place, label, offset in wanted:
        length = min(region, size - offset)
        if length <= 0 or offset in seen:
            continue
        seen.add(offset)
        regions.append({"place": place, "label": label, "offset": offset, "length": length})
    return regions


def first_nonzero(data: bytes) -> int:
    """Index of the first non-zero byte of ``data``, or -1 when it is all zeros."""
    rest = data.lstrip(b"\0")
    return -1 if not rest else len(data) - len(rest)


def find_nonzero(path: str, regions: list) -> list:
    """The regions of ``path`` (a device or a regular file) that hold a non-zero byte."""
    found = []
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for region in regions:
            data = os.pread(fd, region["length"], region["offset"])
            index = first_nonzero(data)
            if index >= 0:
                found.append(dict(region, first_nonzero=region["offset"] + index))
    finally:
        os.close(fd)
    return found


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# ---- blkid -----------------------------------------------------------------------------------


def parse_blkid_export(text: str) -> dict:
    """``blkid --output export`` as a dict, without ``DEVNAME``."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and key != "DEVNAME":
            found[key] = value
    return found


def blkid_signature(run, blkid: str, path: str, offset=None) -> dict:
    """What ``blkid --probe`` finds (superblocks and partition tables); {} for nothing.

    ``run(argv)`` returns (rc, stdout, stderr), as AnsibleModule.run_command does.
    """
    argv = [blkid, "--probe", "--output", "export"]
    if offset is not None:
        argv += ["--offset", str(offset)]
    rc, out, err = run([*argv, path])
    if rc == 0:
        return parse_blkid_export(out)
    if rc == 2:  # blkid: nothing found
        return {}
    raise ProbeError(f"{' '.join(argv)} {path} failed (rc={rc}): {' '.join(err.split())}")


def blkid_partitions(signature: dict) -> list:
    if "PTTYPE" not in signature:
        return []
    return [{"source": "blkid", "table": signature["PTTYPE"], "uuid": signature.get("PTUUID", "")}]


def hidden_signatures(run, blkid: str, path: str, offsets: list, size: int) -> list:
    """Signatures at the given offsets (a filesystem whose partition table was erased)."""
    found = []
    for offset in offsets:
        if 0 < offset < size:
            signature = blkid_signature(run, blkid, path, offset)
            if signature:
                found.append({"offset": offset, "signature": signature})
    return found


# ---- the verdict -----------------------------------------------------------------------------


def signature_text(signature: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in signature.items())


def assess(facts: dict) -> list:
    """One sentence per reason the probed device is not blank; [] means blank."""
    device = facts["device"]
    if not facts["exists"]:
        return [f"{device} does not exist"]
    if not facts["block_device"]:
        return [f"{device} is a {facts['kind']}, not a block device"]
    reasons = []
    signature = {k: v for k, v in facts["signature"].items() if not k.startswith("PT")}
    if signature:
        reasons.append(f"a signature: {signature_text(signature)}")
    parts = facts["partitions"]
    if parts:
        names = [
            f"{p['name']} (kernel)"
            if p["source"] == "kernel"
            else f"a {p['table']} partition table (blkid)"
            for p in parts
        ]
        reasons.append("partitions: " + ", ".join(names))
    if facts["holders"]:
        reasons.append("devices built on it (sysfs holders): " + ", ".join(facts["holders"]))
    if not facts["exclusive_open"]:
        reasons.append(
            f"in use: an exclusive open failed ({facts['exclusive_open_error']}); it is mounted, "
            "active swap, or claimed by device-mapper, RAID or another program"
        )
    if facts["nonzero_regions"]:
        where = ", ".join(
            f"{r['label']} (from byte {r['first_nonzero']})" for r in facts["nonzero_regions"]
        )
        reasons.append(f"non-zero data in {where}; a freshly attached volume reads as zeros")
    for hidden in facts["hidden_signatures"]:
        sig = hidden["signature"]
        what = "a filesystem" if sig.get("USAGE") == "filesystem" else "a signature"
        if "TYPE" in sig:
            what += f" ({sig['TYPE']})"
        reasons.append(
            f"{what} at byte offset {hidden['offset']} ({human_bytes(hidden['offset'])}), where a "
            f"partition starts, though no partition table says so ({signature_text(sig)})"
        )
    return reasons


def probe(
    path: str,
    run,
    blkid: str = "blkid",
    sysfs: str = "/sys",
    region: int = MIB,
    samples: int = 8,
    offsets=(MIB, 63 * SECTOR),
) -> dict:
    """Every fact about ``path`` that decides whether it is blank, and the verdict."""
    kind = path_kind(path)
    facts = {
        "device": path,
        "exists": kind != "missing",
        "block_device": kind == "block device",
        "kind": kind,
        "size_bytes": 0,
        "signature": {},
        "partitions": [],
        "holders": [],
        "exclusive_open": False,
        "exclusive_open_error": "",
        "regions": [],
        "nonzero_regions": [],
        "hidden_signatures": [],
    }
    if facts["block_device"]:
        try:
            facts["size_bytes"] = device_size(path)
            facts["exclusive_open"], facts["exclusive_open_error"] = exclusive_open(path)
            devdir = sysfs_dir(path, sysfs)
            kernel = kernel_partitions(devdir)
            facts["holders"] = holders(devdir, kernel)
            facts["signature"] = blkid_signature(run, blkid, path)
            facts["partitions"] = kernel + blkid_partitions(facts["signature"])
            facts["regions"] = plan_regions(facts["size_bytes"], region, samples)
            facts["nonzero_regions"] = find_nonzero(path, facts["regions"])
        except PermissionError as exc:
            raise ProbeError(
                f"cannot read {path}: {exc.strerror} (the probe needs root: become)"
            ) from exc
        if facts["nonzero_regions"] and not facts["signature"]:
            facts["hidden_signatures"] = hidden_signatures(
                run, blkid, path, list(offsets), facts["size_bytes"]
            )
    reasons = assess(facts)
    facts.update(blank=not reasons, reasons=reasons)
    return facts


ARGUMENT_SPEC = {
    "device": {"type": "path", "required": True},
    "region_bytes": {"type": "int", "default": MIB},
    "samples": {"type": "int", "default": 8},
    "hidden_offsets": {"type": "list", "elements": "int", "default": [MIB, 63 * SECTOR]},
}


def run_module():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    if params["region_bytes"] < SECTOR:
        module.fail_json(
            msg=f"region_bytes must be at least {SECTOR}, got {params['region_bytes']}"
        )
    if params["samples"] < 0:
        module.fail_json(msg=f"samples must be 0 or more, got {params['samples']}")
    blkid = module.get_bin_path("blkid", required=True)

    def run(argv):
        return module.run_command(argv, environ_update={"LC_ALL": "C"})

    try:
        facts = probe(
            params["device"],
            run,
            blkid=blkid,
            region=params["region_bytes"],
            samples=params["samples"],
            offsets=params["hidden_offsets"],
        )
    except (ProbeError, OSError) as exc:
        module.fail_json(msg=f"cannot probe {params['device']}: {exc}", changed=False)
    module.exit_json(changed=False, **facts)


def main():
    run_module()


if __name__ == "__main__":
    main()
