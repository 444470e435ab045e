"""VRAM of the worker's own GPU, and how much a job needs.

NVML (nvidia-ml-py) reads a device in about 0.1 ms; `nvidia-smi` costs a subprocess (about
14 ms) and is only the fallback. The GPU is the one configured by GPU_INDEX, not always GPU 0.
Admission itself lives in worker.py because it talks to ComfyUI (to free its model cache) and to
the queue (to put a job back); this module only measures and estimates, so vram_monitor.py and
tests can use it without either.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger("comfyui_worker.vram")
MIB = 1024 * 1024
NVML_RETRY_S = 60.0
# After a failed nvidia-smi, the next one waits 1 s, doubling up to this.
SMI_BACKOFF_MAX_S = 60.0


@dataclass
class VramReading:
    """One measurement in MiB; `processes` lists (pid, MiB) of compute processes when known."""

    gpu_index: int
    total_mb: int
    free_mb: int
    used_mb: int
    source: str
    name: str = ""
    processes: list[dict[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    return pynvml


class VramProbe:
    """Reads one GPU through NVML, falling back to nvidia-smi; None when neither works."""

    def __init__(
        self,
        gpu_index: int,
        nvml: ModuleType | None = None,
        smi: str | None = "nvidia-smi",
    ) -> None:
        self.gpu_index = gpu_index
        self._nvml = nvml if nvml is not None else _load_nvml()
        self._smi = smi
        self._handle: Any = None
        self._nvml_failed_at: float | None = None
        self._nvml_error = "NVML not installed" if self._nvml is None else ""
        self.last_error: str | None = None
        self._smi_failures = 0
        self._smi_next_at = 0.0
        # True when the last aread() read nothing because nvidia-smi was in its backoff.
        self.skipped = False

    def _nvml_handle(self) -> Any:
        if self._handle is not None or self._nvml is None:
            return self._handle
        if self._nvml_failed_at and time.monotonic() - self._nvml_failed_at < NVML_RETRY_S:
            return None
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        except Exception as exc:
            self._nvml_failed_at = time.monotonic()
            self._nvml_error = f"NVML: {exc}"
            return None
        return self._handle

    def read(self) -> VramReading | None:
        reading = self._try_nvml()
        return reading if reading is not None else self._read_smi()

    async def aread(self) -> VramReading | None:
        """read() for the event loop: nvidia-smi (a subprocess, up to 10 s) runs in a thread,
        and after failures not again before a backoff of 1 s doubling to 60 s."""
        self.skipped = False
        reading = self._try_nvml()
        if reading is not None:
            return reading
        now = time.monotonic()
        if now < self._smi_next_at:
            self.skipped = True
            return None  # last_error still says why
        reading = await asyncio.to_thread(self._read_smi)
        if reading is None:
            self._smi_failures += 1
            delay = min(2.0 ** (self._smi_failures - 1), SMI_BACKOFF_MAX_S)
            self._smi_next_at = time.monotonic() + delay
        else:
            self._smi_failures, self._smi_next_at = 0, 0.0
        return reading

    def _try_nvml(self) -> VramReading | None:
        handle = self._nvml_handle()
        if handle is not None:
            try:
                return self._read_nvml(handle)
            except Exception as exc:
                self._nvml_error = f"NVML: {exc}"
                self.last_error = self._nvml_error
                self._handle = None
                self._nvml_failed_at = time.monotonic()
        return None

    def _read_nvml(self, handle: Any) -> VramReading:
        nvml = self._nvml
        assert nvml is not None
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = ""
        try:
            raw = nvml.nvmlDeviceGetName(handle)
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception:
            pass
        processes = []
        try:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(proc, "usedGpuMemory", None)
                processes.append({"pid": int(proc.pid), "used_mb": int((used or 0) // MIB)})
        except Exception:
            pass
        return VramReading(
            gpu_index=self.gpu_index,
            total_mb=int(mem.total // MIB),
            free_mb=int(mem.free // MIB),
            used_mb=int(mem.used // MIB),
            source="nvml",
            name=name,
            processes=processes,
        )

    def _read_smi(self) -> VramReading | None:
        smi = shutil.which(self._smi) if self._smi else None
        if not smi:
            self.last_error = f"{self._nvml_error or 'NVML unavailable'}; nvidia-smi not found"
            return None
        try:
            out = subprocess.run(
                [
                    smi,
                    f"--id={self.gpu_index}",
                    "--query-gpu=memory.total,memory.free,memory.used,name",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            total, free, used, name = (p.strip() for p in out.strip().splitlines()[0].split(",", 3))
            return VramReading(
                gpu_index=self.gpu_index,
                total_mb=int(float(total)),
                free_mb=int(float(free)),
                used_mb=int(float(used)),
                source="nvidia-smi",
                name=name,
            )
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
            self.last_error = f"{self._nvml_error}; nvidia-smi: {exc}"
            return None


@dataclass
class Estimate:
    """How much a job needs, and where the number came from."""

    estimate_mb: int
    margin_mb: int
    source: str  # metadata | model_table | default
    models: dict[str, int] = field(default_factory=dict)

    @property
    def required_mb(self) -> int:
        return self.estimate_mb + self.margin_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "required_mb": self.required_mb}


def load_table(path: str) -> list[tuple[str, int]]:
    """Reads {"models": {"glob pattern": MiB}}; an empty path means no table."""
    if not path:
        return []
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    models = doc.get("models", doc) if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path}: expected an object of pattern -> MiB")
    table = []
    for pattern, mb in models.items():
        if pattern.startswith("_"):
            continue
        if not isinstance(mb, (int, float)) or isinstance(mb, bool) or mb < 0:
            raise ValueError(f"{path}: {pattern!r} must map to a number of MiB")
        table.append((pattern.lower(), int(mb)))
    return table


def model_files(workflow: Any) -> list[str]:
    """Model file names a workflow loads: string inputs named *_name (ckpt_name, unet_name...)."""
    names: list[str] = []
    if not isinstance(workflow, dict):
        return names
    for node in workflow.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key, value in inputs.items():
            if (
                isinstance(value, str)
                and (key.endswith("_name") or key.rstrip("0123456789").endswith("_name"))
                and value not in names
            ):
                names.append(value)
    return names


def estimate(
    doc: dict[str, Any] | None, table: list[tuple[str, int]], default_mb: int, margin_mb: int
) -> Estimate:
    """metadata.estimated_vram if set, else the sum of matched models in the table, else default."""
    doc = doc or {}
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    declared = meta.get("estimated_vram")
    if isinstance(declared, (int, float)) and not isinstance(declared, bool) and declared > 0:
        return Estimate(int(declared), margin_mb, "metadata")
    matched: dict[str, int] = {}
    for name in model_files(doc.get("workflow")):
        base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
        for pattern, mb in table:
            if fnmatch.fnmatchcase(base, pattern):
                matched[name] = mb
                break
    if matched:
        return Estimate(sum(matched.values()), margin_mb, "model_table", matched)
    return Estimate(default_mb, margin_mb, "default")
