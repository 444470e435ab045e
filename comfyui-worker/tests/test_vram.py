"""VRAM probe (NVML faked, nvidia-smi faked), estimates, admission, and the vram_monitor CLI."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import vram
from config import Config
from jobs import ClaimedJob, JobFailure
from worker import Worker
from worker_testlib import FAKES, WORKER_DIR

MIB = 1024 * 1024


class FakeNvml:
    """Just enough of pynvml: memory of several GPUs, settable per test."""

    def __init__(self, gpus: dict[int, tuple[int, int]], fail_init: bool = False) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if index not in self.gpus:
            raise RuntimeError("Invalid Argument")
        return SimpleNamespace(index=index)

    def nvmlDeviceGetMemoryInfo(self, handle):
        total, free = self.gpus[handle.index]
        return SimpleNamespace(total=total * MIB, free=free * MIB, used=(total - free) * MIB)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=42, usedGpuMemory=1000 * MIB)]


def test_probe_reads_the_configured_gpu_not_gpu0() -> None:
    nvml = FakeNvml({0: (81559, 100), 1: (81559, 70000)})
    reading = vram.VramProbe(1, nvml=nvml, smi=None).read()  # type: ignore[arg-type]
    assert reading is not None
    assert (reading.gpu_index, reading.free_mb, reading.source) == (1, 70000, "nvml")
    assert reading.name == "NVIDIA H100 80GB HBM3"
    assert reading.processes == [{"pid": 42, "used_mb": 1000}]


def _fake_smi(tmp_path: Path, out: str) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\nprintf '{out}\\n'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_probe_falls_back_to_nvidia_smi(tmp_path: Path) -> None:
    smi = _fake_smi(tmp_path, "24576, 20000, 4576, NVIDIA L4")
    probe = vram.VramProbe(2, nvml=FakeNvml({}, fail_init=True), smi=smi)  # type: ignore[arg-type]
    reading = probe.read()
    assert reading is not None and reading.source == "nvidia-smi"
    assert (reading.total_mb, reading.free_mb, reading.name) == (24576, 20000, "NVIDIA L4")
    assert "--id=2" in (tmp_path / "args").read_text()


def test_probe_without_any_gpu_says_why() -> None:
    probe = vram.VramProbe(0, nvml=FakeNvml({}, fail_init=True), smi="/nonexistent/nvidia-smi")  # type: ignore[arg-type]
    assert probe.read() is None
    assert "NVML" in (probe.last_error or "") and "nvidia-smi" in (probe.last_error or "")


def test_estimate_sources(tmp_path: Path) -> None:
    table_file = tmp_path / "t.json"
    table_file.write_text(json.dumps({"models": {"flux1-dev*": 24000, "clip_l*": 300}}))
    table = vram.load_table(str(table_file))
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "FLUX1-dev.safetensors"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors"}},
        "3": {"class_type": "X", "inputs": {"text": "flux1-dev is not a model input"}},
    }
    by_table = vram.estimate({"workflow": wf}, table, 4096, 1024)
    assert (by_table.source, by_table.estimate_mb, by_table.required_mb) == (
        "model_table",
        24300,
        25324,
    )
    declared = vram.estimate({"workflow": wf, "metadata": {"estimated_vram": 9000}}, table, 1, 2)
    assert (declared.source, declared.required_mb) == ("metadata", 9002)
    fallback = vram.estimate({"workflow": {}}, table, 4096, 1024)
    assert (fallback.source, fallback.required_mb) == ("default", 5120)


def test_shipped_table_loads() -> None:
    assert vram.load_table(str(WORKER_DIR / "vram_table.json"))


class FakeProbe:
    def __init__(self, total: int, free: int) -> None:
        self.total, self.free, self.last_error = total, free, None
        self.reads = 0

    def read(self):
        self.reads += 1
        return vram.VramReading(0, self.total, self.free, self.total - self.free, "nvml")

    async def aread(self):
        return self.read()


class FakeComfy:
    """Frees `frees` MiB on the probe when asked, as ComfyUI unloading its models would."""

    def __init__(self, probe: FakeProbe, frees: int) -> None:
        self.probe, self.frees, self.free_calls = probe, frees, 0
        self.version = "0.11.0"
        self.connected = asyncio.Event()

    async def free(self) -> None:
        self.free_calls += 1
        self.probe.free += self.frees


class FakeSource:
    def __init__(self) -> None:
        self.requeued: list[str] = []

    async def requeue(self, job, reason):
        self.requeued.append(reason)
        return True

    async def retry(self, job, reason, delay):
        self.requeued.append(reason)
        return "requeued"


def _admit(total: int, free: int, frees: int, need_mb: int):
    cfg = Config.from_env({"VRAM_CHECK": "on", "VRAM_MARGIN_MB": "1000", "VRAM_FREE_WAIT": "0.3"})
    probe = FakeProbe(total, free)
    comfy = FakeComfy(probe, frees)
    source = FakeSource()

    async def go():
        worker = Worker(cfg, source, comfy, probe)  # type: ignore[arg-type]
        job = ClaimedJob("j", {"metadata": {"estimated_vram": need_mb}, "workflow": {}}, 10)
        return await worker._admit(job)

    return asyncio.run(go()), comfy, source


def test_admits_when_free() -> None:
    ok, comfy, source = _admit(80000, 50000, 0, 10000)
    assert ok and comfy.free_calls == 0 and not source.requeued


def test_frees_comfyui_cache_then_admits() -> None:
    ok, comfy, source = _admit(80000, 5000, 40000, 10000)
    assert ok and comfy.free_calls == 1 and not source.requeued


def test_requeues_when_others_hold_the_memory() -> None:
    ok, comfy, source = _admit(80000, 5000, 0, 10000)
    assert not ok and comfy.free_calls == 1
    assert source.requeued and "11000 MiB" in source.requeued[0]


def test_never_fits_fails_with_both_numbers() -> None:
    with pytest.raises(JobFailure) as info:
        _admit(24000, 24000, 0, 30000)
    assert info.value.kind == "vram"
    assert "31000 MiB" in info.value.message and "24000 MiB" in info.value.message


def _monitor(*args: str, state: dict | None, tmp_path: Path, stdin: str = ""):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VRAM_", "GPU_"))}
    env["PYTHONPATH"] = str(FAKES)
    env["PATH"] = "/usr/bin:/bin"
    if state is not None:
        (tmp_path / "nvml.json").write_text(json.dumps(state))
    env["FAKE_NVML_FILE"] = str(tmp_path / "nvml.json")
    done = subprocess.run(
        [sys.executable, str(WORKER_DIR / "vram_monitor.py"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
    )
    return done.returncode, json.loads(done.stdout)


def test_monitor_stats(tmp_path: Path) -> None:
    rc, doc = _monitor("stats", state={"total_mb": 81559, "free_mb": 80000}, tmp_path=tmp_path)
    assert rc == 0 and doc["free_mb"] == 80000 and doc["source"] == "nvml"
    rc, doc = _monitor("stats", state=None, tmp_path=tmp_path / "none")
    assert rc == 2 and doc["available"] is False and doc["error"]


def test_monitor_estimate_and_check(tmp_path: Path) -> None:
    job = json.dumps({"metadata": {"estimated_vram": 20000}, "workflow": {}})
    rc, doc = _monitor("estimate", "-", state=None, tmp_path=tmp_path, stdin=job)
    assert rc == 0 and doc["required_mb"] == 21024 and doc["source"] == "metadata"
    state = {"total_mb": 81559, "free_mb": 10000}
    rc, doc = _monitor("check", "-", state=state, tmp_path=tmp_path, stdin=job)
    assert rc == 1 and doc["fits"] is False and doc["can_ever_fit"] is True
    rc, doc = _monitor("check", "--required", "5000", state=state, tmp_path=tmp_path)
    assert rc == 0 and doc["fits"] is True
