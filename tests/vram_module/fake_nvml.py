"""A stand-in for the pynvml module: just the calls gpu_vram makes, with the semantics
nvidia-ml-py documents (bytes for memory, NVMLError subclasses for failures).

Its figures are copied from the recorded H200 fixture (h200_8gpu_query_gpu_before.csv) so
the NVML and nvidia-smi paths can be compared; it is a test double, not a recording.
"""

from __future__ import annotations

from types import SimpleNamespace

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class FakeNvml:
    """One instance is one host. ``gpus`` are dicts with MiB figures."""

    nvmlMemory_v2 = 0x02000028
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus, *, driver="570.211.01", cuda=12080, init_error=None, v2=True):
        self._gpus = gpus
        self._driver = driver
        self._cuda = cuda
        self._init_error = init_error
        self._v2 = v2
        self.initialised = False
        self.shutdowns = 0

    def nvmlInit(self):
        if self._init_error is not None:
            raise self._init_error
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._gpus[index]

    def nvmlDeviceGetName(self, handle):
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle):
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version is not None:
            if not self._v2:
                raise NVMLError_NotSupported()
            return SimpleNamespace(
                version=version,
                total=handle["total"] * MIB,
                reserved=handle["reserved"] * MIB,
                free=handle["free"] * MIB,
                used=handle["used"] * MIB,
            )
        # v1 counts reserved memory as used.
        return SimpleNamespace(
            total=handle["total"] * MIB,
            free=handle["free"] * MIB,
            used=(handle["used"] + handle["reserved"]) * MIB,
        )

    def nvmlDeviceGetUtilizationRates(self, handle):
        if handle.get("util") is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=handle["util"], memory=handle.get("mem_util", 0))

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle["temp"]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=None if used is None else used * MIB)
            for pid, _name, used in handle.get("procs", [])
        ]

    def nvmlSystemGetProcessName(self, pid):
        for gpu in self._gpus:
            for proc_pid, name, _used in gpu.get("procs", []):
                if proc_pid == pid and name is not None:
                    return name.encode()
        raise NVMLError_NotSupported()

    def nvmlSystemGetDriverVersion(self):
        return self._driver

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return self._cuda

    def nvmlSystemGetCudaDriverVersion(self):
        return self._cuda


def h200_pair():
    """GPU 0 and 7 of the recorded H200 host, with 480 MiB reserved taken out of used."""
    return [
        {
            "name": "NVIDIA H200",
            "uuid": "GPU-a44622e3-2296-6285-0a86-84d0f6c67900",
            "total": 143771,
            "used": 130013 - 480,
            "reserved": 480,
            "free": 143771 - 130013,
            "util": 100,
            "mem_util": 37,
            "temp": 41,
            "procs": [(1328667, "/usr/local/bin/python3.10", 130004)],
        },
        {
            "name": "NVIDIA H200",
            "uuid": "GPU-28780eb0-24d5-1f13-59b8-ae5c23617a72",
            "total": 143771,
            "used": 58071 - 480,
            "reserved": 480,
            "free": 143771 - 58071,
            "util": None,
            "temp": 35,
            "procs": [(1758887, None, 58060)],
        },
    ]
