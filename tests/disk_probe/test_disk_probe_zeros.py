"""The zero check and the verdict, on regular files and plain fact dictionaries (no root)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
from disk_helpers import MIB, ext4_behind_erased_gpt, populated_dir, run, sparse_image, write_at

SIZE = 64 * MIB


def places(regions: list[dict]) -> list[str]:
    return [r["place"] for r in regions]


# ---- which regions are read -----------------------------------------------------------------


def test_regions_cover_first_second_samples_and_last(dp):
    regions = dp.plan_regions(SIZE)
    assert places(regions) == ["first", "second"] + ["sample"] * 8 + ["last"]
    assert regions[0] == {"place": "first", "label": "the first 1 MiB", "offset": 0, "length": MIB}
    assert regions[1]["offset"] == MIB
    assert regions[-1] == {
        "place": "last",
        "label": "the last 1 MiB",
        "offset": SIZE - MIB,
        "length": MIB,
    }
    offsets = [r["offset"] for r in regions]
    assert offsets == sorted(set(offsets))
    assert all(r["offset"] % 4096 == 0 and r["offset"] + r["length"] <= SIZE for r in regions)


def test_regions_of_a_small_device_stay_inside_it(dp):
    size = MIB + MIB // 2
    regions = dp.plan_regions(size, samples=3)
    assert regions[0]["length"] == MIB
    assert all(r["offset"] + r["length"] <= size for r in regions)
    assert len({r["offset"] for r in regions}) == len(regions)
    assert regions[-1]["place"] == "last" and regions[-1]["offset"] == size - MIB


def test_no_regions_for_an_empty_device(dp):
    assert dp.plan_regions(0) == []


def test_first_nonzero(dp):
    assert dp.first_nonzero(b"") == -1
    assert dp.first_nonzero(bytes(4096)) == -1
    assert dp.first_nonzero(bytes(7) + b"\x01") == 7
    assert dp.first_nonzero(b"\xff") == 0


# ---- what the zero check finds in a file ----------------------------------------------------


def test_a_zeroed_image_has_no_nonzero_region(dp, tmp_path):
    image = sparse_image(tmp_path / "disk.img", SIZE)
    assert dp.find_nonzero(str(image), dp.plan_regions(SIZE)) == []


@pytest.mark.parametrize(
    ("offset", "place"),
    [
        (512, "first"),  # an MBR, a tar header
        (MIB + 1024, "second"),  # an ext4 superblock at 1 MiB
        (SIZE - 1, "last"),  # a GPT's backup header
        (SIZE // 9 * 4 // 4096 * 4096 + 100, "sample"),
    ],
)
def test_one_nonzero_byte_is_found_where_it_is(dp, tmp_path, offset, place):
    image = sparse_image(tmp_path / "disk.img", SIZE)
    write_at(image, offset, b"\x01")
    found = dp.find_nonzero(str(image), dp.plan_regions(SIZE))
    assert [(r["place"], r["first_nonzero"]) for r in found] == [(place, offset)]


def test_a_tar_archive_carries_no_signature_but_holds_data(dp, tmp_path):
    """The first incident's premise: blkid sees nothing in a tar archive; the zeros check does."""
    image = sparse_image(tmp_path / "disk.img", SIZE)
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as archive:
        archive.add(populated_dir(tmp_path), arcname="outputs")
    write_at(image, 0, payload.getvalue())
    assert dp.blkid_signature(run, "blkid", str(image)) == {}
    found = dp.find_nonzero(str(image), dp.plan_regions(SIZE))
    assert found and found[0]["place"] == "first" and found[0]["first_nonzero"] == 0


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs e2fsprogs")
def test_ext4_behind_an_erased_gpt_carries_no_signature_but_holds_data(dp, tmp_path):
    """The second incident's premise: after `wipefs -a` blkid sees nothing at offset 0, the
    GPT's remains fill the first and last MiB, and the filesystem is still at 1 MiB."""
    image = tmp_path / "disk.img"
    ext4_behind_erased_gpt(image, SIZE, populated_dir(tmp_path))
    assert dp.blkid_signature(run, "blkid", str(image)) == {}
    found = {r["place"] for r in dp.find_nonzero(str(image), dp.plan_regions(SIZE))}
    assert {"first", "second", "last"} <= found
    hidden = dp.hidden_signatures(run, "blkid", str(image), [dp.MIB, 63 * 512], SIZE)
    assert [(h["offset"], h["signature"]["TYPE"]) for h in hidden] == [(MIB, "ext4")]


# ---- the verdict ------------------------------------------------------------------------------


def facts(**over) -> dict:
    base = {
        "device": "/dev/vdb",
        "exists": True,
        "block_device": True,
        "kind": "block device",
        "signature": {},
        "partitions": [],
        "holders": [],
        "exclusive_open": True,
        "exclusive_open_error": "",
        "nonzero_regions": [],
        "hidden_signatures": [],
    }
    base.update(over)
    return base


def test_blank_has_no_reason(dp):
    assert dp.assess(facts()) == []


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"exists": False, "block_device": False, "kind": "missing"}, ["/dev/vdb does not exist"]),
        (
            {"block_device": False, "kind": "regular file"},
            ["/dev/vdb is a regular file, not a block device"],
        ),
        (
            {"signature": {"UUID": "u", "TYPE": "ext4", "USAGE": "filesystem"}},
            ["a signature: UUID=u TYPE=ext4 USAGE=filesystem"],
        ),
        (
            {"partitions": [{"source": "blkid", "table": "gpt", "uuid": "p"}]},
            ["partitions: a gpt partition table (blkid)"],
        ),
        (
            {"partitions": [{"source": "kernel", "name": "vdb1", "number": 1}]},
            ["partitions: vdb1 (kernel)"],
        ),
        ({"holders": ["dm-0", "md0 (on vdb1)"]}, ["holders): dm-0, md0 (on vdb1)"]),
        (
            {"exclusive_open": False, "exclusive_open_error": "EBUSY: Device or resource busy"},
            ["in use: an exclusive open failed (EBUSY: Device or resource busy)", "mounted"],
        ),
        (
            {
                "nonzero_regions": [
                    {"label": "the first 1 MiB", "first_nonzero": 512},
                    {"label": "the last 1 MiB", "first_nonzero": 67108352},
                ]
            },
            [
                "non-zero data in the first 1 MiB (from byte 512), "
                "the last 1 MiB (from byte 67108352)"
            ],
        ),
        (
            {
                "hidden_signatures": [
                    {"offset": MIB, "signature": {"TYPE": "ext4", "USAGE": "filesystem"}}
                ]
            },
            ["a filesystem (ext4) at byte offset 1048576 (1 MiB)", "no partition table says so"],
        ),
    ],
)
def test_each_finding_is_one_reason_that_says_what_was_found(dp, over, words):
    reasons = dp.assess(facts(**over))
    assert len(reasons) == 1, reasons
    for word in words:
        assert word in reasons[0]


def test_the_signature_reason_leaves_the_partition_table_to_the_partitions_reason(dp):
    gpt = {"PTUUID": "p", "PTTYPE": "gpt"}
    reasons = dp.assess(
        facts(signature=gpt, partitions=[{"source": "blkid", "table": "gpt", "uuid": "p"}])
    )
    assert reasons == ["partitions: a gpt partition table (blkid)"]


def test_human_bytes(dp):
    assert dp.human_bytes(MIB) == "1 MiB"
    assert dp.human_bytes(32256) == "32256 bytes"
    assert dp.human_bytes(4096) == "4 KiB"
    assert dp.human_bytes(1 << 30) == "1 GiB"
