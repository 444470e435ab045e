"""nvidia-smi CSV parsing, fed the exact text recorded on real H100/H200 machines."""

from __future__ import annotations

import pytest
from vram_helpers import fixture_text


def test_header_names_the_columns_and_units_are_stripped(gv):
    rows = gv.parse_csv(fixture_text("h200_8gpu_query_gpu_before.csv"))
    assert len(rows) == 8
    assert rows[0] == {
        "index": 0,
        "uuid": "GPU-a44622e3-2296-6285-0a86-84d0f6c67900",
        "memory.used": 130013,
        "memory.total": 143771,
        "utilization.gpu": 100,
    }


def test_h200_gpus_without_a_free_column_get_free_from_total_minus_used(gv):
    gpus = gv.gpus_from_smi_rows(gv.parse_csv(fixture_text("h200_8gpu_query_gpu_before.csv")))
    assert [gpu["index"] for gpu in gpus] == list(range(8))
    assert gpus[0]["memory_free_mb"] == 143771 - 130013
    assert gpus[7]["memory_free_mb"] == 143771 - 58071
    assert gpus[7]["utilization_gpu_pct"] == 0
    assert gpus[0]["name"] is None  # not asked for in that recording
    assert gpus[0]["memory_reserved_mb"] is None


def test_h100_headerless_rows_take_the_given_field_order(gv):
    fields = ["index", "name", "memory.total", "memory.used", "memory.free"]
    gpus = gv.gpus_from_smi_rows(
        gv.parse_csv(fixture_text("h100_2gpu_total_used_free_noheader.csv"), fields)
    )
    assert [(g["index"], g["name"]) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3"),
        (1, "NVIDIA H100 80GB HBM3"),
    ]
    assert (gpus[1]["memory_total_mb"], gpus[1]["memory_used_mb"], gpus[1]["memory_free_mb"]) == (
        81559,
        37155,
        43925,
    )
    # What nvidia-smi counts in neither used nor free is the driver's reservation.
    assert {g["memory_total_mb"] - g["memory_used_mb"] - g["memory_free_mb"] for g in gpus} == {479}


def test_headerless_text_without_fields_is_refused(gv):
    with pytest.raises(gv.GpuReadError, match="no header"):
        gv.parse_csv(fixture_text("h100_2gpu_total_used_free_noheader.csv"))


def test_header_aliases_and_text_columns(gv):
    rows = gv.parse_csv(fixture_text("h100_name_busid_vbios.csv"))
    assert rows == [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "pci.bus_id": "00000000:04:00.0",
            "vbios_version": "96.00.89.00.01",
        },
        {
            "name": "NVIDIA H100 80GB HBM3",
            "pci.bus_id": "00000000:8B:00.0",
            "vbios_version": "96.00.89.00.01",
        },
    ]
    gpus = gv.gpus_from_smi_rows(rows)
    assert [g["index"] for g in gpus] == [0, 1]  # no index column: position
    assert gpus[0]["memory_total_mb"] is None


def test_driver_version_stays_text(gv):
    rows = gv.parse_csv(fixture_text("h200_8gpu_index_name_total_driver.csv"))
    assert len(rows) == 8
    assert {row["driver_version"] for row in rows} == {"570.211.01"}
    assert rows[3]["power.limit"] == 700.0
    assert rows[3]["pstate"] == "P0"
    assert gv.gpus_from_smi_rows(rows)[3]["memory_total_mb"] == 143771


def test_compute_apps_group_by_gpu_and_not_found_is_none(gv):
    by_uuid = gv.processes_from_smi_rows(
        gv.parse_csv(fixture_text("h200_8gpu_compute_apps_before.csv"), gv.SMI_APP_FIELDS)
    )
    assert len(by_uuid) == 8
    assert by_uuid["GPU-a44622e3-2296-6285-0a86-84d0f6c67900"] == [
        {"pid": 1328667, "name": "/usr/local/bin/python3.10", "used_memory_mb": 130004}
    ]
    assert by_uuid["GPU-28780eb0-24d5-1f13-59b8-ae5c23617a72"] == [
        {"pid": 1758887, "name": None, "used_memory_mb": 58060}
    ]


def test_banner_versions(gv):
    assert gv.parse_banner_versions(fixture_text("h200_nvidia_smi_banner.txt")) == (
        "570.211.01",
        "12.8",
    )
    assert gv.parse_banner_versions("") == (None, None)


@pytest.mark.parametrize(
    ("cell", "value"),
    [("81559 MiB", 81559), ("100 %", 100), ("700.00 W", 700.0), ("[N/A]", None), ("", None)],
)
def test_parse_value(gv, cell, value):
    assert gv.parse_value(cell) == value


def test_ragged_row_is_an_error_not_a_guess(gv):
    with pytest.raises(gv.GpuReadError, match="2 fields, expected 3"):
        gv.parse_csv("index, name, memory.total [MiB]\n0, NVIDIA H200\n")


def replay(recorded):
    """run() stand-in answering each nvidia-smi call from recorded text."""
    calls = []

    def run(argv):
        calls.append(argv)
        joined = " ".join(argv[1:])
        if "--query-gpu=" in joined:
            return recorded["gpu"]
        if "--query-compute-apps=" in joined:
            return recorded["apps"]
        return recorded["banner"]

    return run, calls


def test_read_nvidia_smi_end_to_end_on_the_h200_recording(gv):
    run, calls = replay(
        {
            "gpu": (0, fixture_text("h200_8gpu_query_gpu_after.csv"), ""),
            "apps": (0, fixture_text("h200_8gpu_compute_apps_after.csv"), ""),
            "banner": (0, fixture_text("h200_nvidia_smi_banner.txt"), ""),
        }
    )
    reading = gv.read_nvidia_smi(run, "/usr/bin/nvidia-smi")
    assert reading["backend"] == "nvidia-smi"
    assert (reading["driver_version"], reading["cuda_version"]) == ("570.211.01", "12.8")
    assert len(reading["gpus"]) == 8
    assert reading["gpus"][2]["processes"] == []
    assert reading["gpus"][2]["memory_free_mb"] == 143771
    assert [p["pid"] for p in reading["gpus"][0]["processes"]] == [1328667]
    assert calls[0][1].startswith("--query-gpu=index,name,uuid,memory.total")
    assert calls[0][2] == "--format=csv,nounits"


def test_read_nvidia_smi_retries_without_fields_an_old_driver_rejects(gv):
    answers = [
        (2, "", 'Field "memory.reserved" is not a valid field to query.\n'),
        (0, fixture_text("h200_8gpu_query_gpu_before.csv"), ""),
        (0, fixture_text("h200_nvidia_smi_banner.txt"), ""),
    ]
    calls = []

    def run(argv):
        calls.append(argv)
        return answers.pop(0)

    reading = gv.read_nvidia_smi(run, "nvidia-smi", include_processes=False)
    assert "memory.reserved" in calls[0][1]
    assert "memory.reserved" not in calls[1][1]
    assert len(reading["gpus"]) == 8


def test_read_nvidia_smi_driver_failure_is_no_gpu(gv):
    def run(argv):
        return (
            9,
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.\n\n",
            "",
        )

    with pytest.raises(gv.NoGpuError, match="couldn't communicate with the NVIDIA driver"):
        gv.read_nvidia_smi(run, "nvidia-smi")
