"""The NVML path, driven by a fake pynvml module passed in as an argument."""

from __future__ import annotations

import pytest
from fake_nvml import FakeNvml, NVMLError_LibraryNotFound, h200_pair


def test_read_nvml_reports_memory_in_mib_with_reserved(gv):
    nvml = FakeNvml(h200_pair())
    reading = gv.read_nvml(nvml)
    assert reading["backend"] == "nvml"
    assert (reading["driver_version"], reading["cuda_version"]) == ("570.211.01", "12.8")
    first = reading["gpus"][0]
    assert first["index"] == 0
    assert first["uuid"] == "GPU-a44622e3-2296-6285-0a86-84d0f6c67900"
    assert (first["memory_total_mb"], first["memory_free_mb"], first["memory_reserved_mb"]) == (
        143771,
        13758,
        480,
    )
    assert (
        first["memory_used_mb"] + first["memory_free_mb"] + first["memory_reserved_mb"]
        == (first["memory_total_mb"])
    )
    assert (first["utilization_gpu_pct"], first["utilization_memory_pct"]) == (100, 37)
    assert first["temperature_c"] == 41
    assert first["processes"] == [
        {"pid": 1328667, "name": "/usr/local/bin/python3.10", "used_memory_mb": 130004}
    ]
    assert nvml.shutdowns == 1


def test_unsupported_readings_are_none_not_errors(gv):
    second = gv.read_nvml(FakeNvml(h200_pair()))["gpus"][1]
    assert second["utilization_gpu_pct"] is None
    assert second["processes"] == [{"pid": 1758887, "name": None, "used_memory_mb": 58060}]


def test_v1_fallback_has_no_reserved(gv):
    first = gv.read_nvml(FakeNvml(h200_pair(), v2=False))["gpus"][0]
    assert first["memory_reserved_mb"] is None
    assert first["memory_free_mb"] == 13758


def test_processes_can_be_left_out(gv):
    reading = gv.read_nvml(FakeNvml(h200_pair()), include_processes=False)
    assert all(gpu["processes"] == [] for gpu in reading["gpus"])


def test_missing_library_is_no_gpu(gv):
    with pytest.raises(gv.NoGpuError, match="NVML: NVML Shared Library Not Found"):
        gv.read_nvml(FakeNvml([], init_error=NVMLError_LibraryNotFound()))


def test_zero_gpus_is_no_gpu_and_shuts_down(gv):
    nvml = FakeNvml([])
    with pytest.raises(gv.NoGpuError, match="no GPU"):
        gv.read_nvml(nvml)
    assert nvml.shutdowns == 1


def test_cuda_version_from_int(gv):
    assert gv.cuda_version_from_int(12040) == "12.4"
    assert gv.cuda_version_from_int(13000) == "13.0"


def test_auto_falls_back_to_nvidia_smi_and_keeps_both_reasons(gv):
    broken = FakeNvml([], init_error=NVMLError_LibraryNotFound())
    reading = {"backend": "nvidia-smi", "gpus": [], "driver_version": None, "cuda_version": None}
    assert gv.read_gpus("auto", broken, lambda _p: reading, True) is reading
    with pytest.raises(gv.NoGpuError) as info:
        gv.read_gpus("auto", broken, lambda _p: None, True)
    assert str(info.value) == "NVML: NVML Shared Library Not Found; nvidia-smi: not found"


def test_backend_nvml_never_runs_nvidia_smi(gv):
    def forbidden(_include):
        raise AssertionError("nvidia-smi must not run")

    reading = gv.read_gpus("nvml", FakeNvml(h200_pair()), forbidden, True)
    assert reading["backend"] == "nvml"


def test_nvml_and_nvidia_smi_agree_on_the_same_host(gv):
    """The fake NVML host mirrors GPU 0 and 7 of the recorded nvidia-smi output."""
    from vram_helpers import fixture_text

    smi = gv.gpus_from_smi_rows(gv.parse_csv(fixture_text("h200_8gpu_query_gpu_before.csv")))
    nvml = gv.read_nvml(FakeNvml(h200_pair()))["gpus"]
    for from_nvml, from_smi in zip(nvml, (smi[0], smi[7]), strict=True):
        assert from_nvml["uuid"] == from_smi["uuid"]
        assert from_nvml["memory_total_mb"] == from_smi["memory_total_mb"]
        assert from_nvml["memory_free_mb"] == from_smi["memory_free_mb"]
