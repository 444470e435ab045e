"""A test double of nvidia-ml-py's `pynvml` module, for machines without a GPU.

Tests put this folder first on PYTHONPATH of a worker process. Each call reads the JSON file named
by FAKE_NVML_FILE, so a test changes the GPU's memory while the worker runs:
{"total_mb": 81559, "free_mb": 80000, "used_mb": 1559, "name": "NVIDIA H100", "processes": []}
Without the file, nvmlInit fails like a host without the driver. With "lost": true every call
fails as NVML does for a GPU that fell off the bus or a container that lost its devices.
"""

import json
import os
from types import SimpleNamespace

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


def _state():
    path = os.environ.get("FAKE_NVML_FILE", "")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise NVMLError(f"NVML Shared Library Not Found ({exc})") from None
    if state.get("lost"):
        raise NVMLError("GPU is lost")
    return state


def nvmlInit():
    _state()


def nvmlDeviceGetHandleByIndex(index):
    state = _state()
    if index >= state.get("count", 1):
        raise NVMLError("Invalid Argument")
    return SimpleNamespace(index=index)


def nvmlDeviceGetMemoryInfo(handle):
    state = _state()
    per_gpu = state.get("gpus", {}).get(str(handle.index), state)
    total = per_gpu["total_mb"] * MIB
    free = per_gpu["free_mb"] * MIB
    return SimpleNamespace(total=total, free=free, used=total - free)


def nvmlDeviceGetName(handle):
    return _state().get("name", "NVIDIA Fake GPU")


def nvmlDeviceGetComputeRunningProcesses(handle):
    return [
        SimpleNamespace(pid=p["pid"], usedGpuMemory=p["used_mb"] * MIB)
        for p in _state().get("processes", [])
    ]
