"""Selecting GPUs, the free-memory gate and the facts, as plain functions."""

from __future__ import annotations

import pytest
from vram_helpers import fixture_text


@pytest.fixture
def h200(gv):
    return gv.gpus_from_smi_rows(gv.parse_csv(fixture_text("h200_8gpu_query_gpu_before.csv")))


def test_select_by_index_and_uuid_in_index_order(gv, h200):
    chosen = gv.select_gpus(h200, ["7", "GPU-4E9E74B7-4977-F04D-3AF3-CCFE5F570E90", "7"])
    assert [gpu["index"] for gpu in chosen] == [2, 7]
    assert gv.select_gpus(h200, []) == h200


def test_unknown_selector_names_what_exists(gv, h200):
    with pytest.raises(gv.GpuReadError, match=r"no GPU matches '9'; this host has: 0 \(GPU-a446"):
        gv.select_gpus(h200, ["9"])


def test_gate_off_by_default(gv, h200):
    gate, failure = gv.check_gate(h200, 0, 0)
    assert failure is None
    assert gate == {"min_free_mb": 0, "safety_margin_mb": 0, "passed": True, "failing": []}


def test_gate_message_gives_the_numbers(gv, h200):
    gate, failure = gv.check_gate(h200, 20000, 2048)
    assert gate["passed"] is False
    assert gate["failing"] == [0, 1, 3]  # 13758, 13718, 13778 MiB free
    assert failure.startswith("GPU memory below min_free_mb=20000 MiB on 3 of 8 GPU(s): ")
    assert (
        "GPU 0: 13758 MiB free - 2048 MiB margin = 11710 MiB available, 8290 MiB short" in failure
    )
    assert "\n" not in failure


def test_gate_passes_on_the_idle_gpu(gv, h200):
    gate, failure = gv.check_gate(gv.select_gpus(h200, ["7"]), 20000, 2048)
    assert failure is None and gate["passed"] is True


def test_gate_without_gpus_fails(gv):
    gate, failure = gv.check_gate([], 1, 0)
    assert gate["passed"] is False
    assert failure == "min_free_mb=1 MiB asked for, but no GPU was found to check"


def test_unknown_free_fails_the_gate(gv):
    gpus = gv.gpus_from_smi_rows(gv.parse_csv(fixture_text("h100_name_busid_vbios.csv")))
    _gate, failure = gv.check_gate(gpus, 1, 0)
    assert "GPU 0 (NVIDIA H100 80GB HBM3): free memory unknown" in failure


def test_margin_never_goes_negative(gv, h200):
    gpus = gv.apply_margin(gv.select_gpus(h200, ["0", "7"]), 20000)
    assert [gpu["available_mb"] for gpu in gpus] == [0, 85700 - 20000]


def test_facts_shape(gv, h200):
    reading = {"backend": "nvidia-smi", "driver_version": "570.211.01", "cuda_version": "12.8"}
    facts = gv.build_facts(dict(reading, gpus=h200[:2]))
    assert facts == {
        "comfyume_gpus": h200[:2],
        "comfyume_gpu_count": 2,
        "comfyume_gpu_driver_version": "570.211.01",
        "comfyume_cuda_version": "12.8",
        "comfyume_gpu_backend": "nvidia-smi",
    }


def test_one_line(gv):
    assert gv.one_line("a\n  b\tc ") == "a b c"
