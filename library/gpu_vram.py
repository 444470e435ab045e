#!/usr/bin/python
# Copyright: comfyume GPU host project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module gpu_vram: read NVIDIA GPU memory, gate plays on it, publish it as facts.

Everything that reads or decides lives in plain functions that take the NVML module
object or the text ``nvidia-smi`` printed, so the tests can drive them with a fake NVML
and with outputs recorded on real machines. The file is self-contained because Ansible
ships it alone to the target; the target side must run on Python 3.10, the oldest Python of
the hosts it is for (Ubuntu 22.04's): ruff lints it for that version (pyproject.toml) and the
tests run it there, on both backends (tests/vram_module/test_python_floor.py).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_vram
short_description: Report NVIDIA GPU memory, gate on free memory, set GPU facts
description:
  - Reads every NVIDIA GPU on the target through NVML (the C(nvidia-ml-py) binding,
    imported as C(pynvml)) when it is importable and the driver answers, and through
    C(nvidia-smi --query-gpu ... --format=csv) otherwise. The result says which in RV(backend).
  - Reports, per GPU, the index, name, UUID, total, used, free and (where the driver gives it)
    reserved memory in MiB, GPU and memory utilisation, temperature, and the compute processes
    with their memory; plus the driver and CUDA versions.
  - With O(min_free_mb) the task fails, with a message giving the numbers, when a selected GPU
    has less free memory than asked for (after O(safety_margin_mb) is taken off), so a play can
    stop before it starts work that cannot fit.
  - With O(facts=true) it sets C(ansible_facts.comfyume_gpus), C(comfyume_gpu_count),
    C(comfyume_gpu_driver_version), C(comfyume_cuda_version) and C(comfyume_gpu_backend)
    for later roles (the worker role sizes itself from C(comfyume_gpu_count)).
  - Read-only. It never reports C(changed) and runs the same in check mode.
  - "A host without an NVIDIA GPU or driver fails with one line that says so
    (C(no NVIDIA GPU or driver on this host: <reasons>)), unless O(allow_no_gpu=true)."
version_added: "1.0.0"
author:
  - comfyume GPU host maintainers
options:
  gpus:
    description:
      - The GPUs to report on and to gate, each given by its index (C(0)) or its UUID
        (C(GPU-...)). An empty list selects every GPU.
      - A selector that matches no GPU fails the task and names the GPUs that exist.
    type: list
    elements: str
    default: []
  min_free_mb:
    description:
      - Free memory, in MiB, that every selected GPU must have after O(safety_margin_mb) is
        subtracted. When one has less, the task fails and the message gives, per GPU, free,
        margin, available and the threshold.
      - C(0) reports without gating.
      - On a host without a GPU a non-zero value fails even with O(allow_no_gpu=true), because a
        gate cannot pass where there is nothing to measure.
    type: int
    default: 0
  safety_margin_mb:
    description:
      - MiB held back from each GPU's free memory before it is compared with O(min_free_mb)
        (headroom for CUDA context and allocator fragmentation). Reported per GPU as
        C(available_mb).
    type: int
    default: 0
  facts:
    description:
      - Also return the readings as C(ansible_facts) (C(comfyume_gpus), C(comfyume_gpu_count),
        C(comfyume_gpu_driver_version), C(comfyume_cuda_version), C(comfyume_gpu_backend)).
      - The facts describe the selected GPUs only.
    type: bool
    default: false
  allow_no_gpu:
    description:
      - On a host with no NVIDIA GPU or driver, succeed with C(gpu_count=0) (and facts saying
        so) instead of failing. Meant for simulated hosts in CI that have no GPU.
    type: bool
    default: false
  backend:
    description:
      - How to read the GPUs. C(auto) tries NVML first and falls back to C(nvidia-smi).
      - C(nvml) and C(nvidia-smi) use only that one.
    type: str
    choices: [auto, nvml, nvidia-smi]
    default: auto
  include_processes:
    description:
      - List the compute processes on each GPU with the memory they hold.
    type: bool
    default: true
  nvidia_smi_path:
    description:
      - The C(nvidia-smi) executable, as a path or a name looked up in C(PATH) and the usual
        system directories.
    type: str
    default: nvidia-smi
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
notes:
  - Memory figures are MiB (1 MiB = 1048576 bytes), as C(nvidia-smi) prints them.
  - NVML is queried with the v2 memory structure, which reports reserved memory and counts it
    out of C(used); drivers without it fall back to v1, where C(memory_reserved_mb) is C(null).
  - When C(nvidia-smi) does not print C(memory.free), free is derived as total - used - reserved.
  - NVML reads take about 0.1 ms where an C(nvidia-smi) subprocess takes tens of milliseconds.
requirements:
  - Python 3.10 or later on the target.
  - An NVIDIA driver on the target; C(nvidia-ml-py) on the target's Python for the NVML backend.
"""

EXAMPLES = r"""
- name: Report GPU memory on every GPU worker (ad hoc equivalent below)
  gpu_vram:
  register: vram
  # ansible verda-h100 -m gpu_vram

- name: Stop unless every GPU has 20 GiB free with 2 GiB held back
  gpu_vram:
    min_free_mb: 20480
    safety_margin_mb: 2048
  # ansible verda-h100 -m gpu_vram -a 'min_free_mb=20480 safety_margin_mb=2048'

- name: Check only GPU 0 and one GPU by UUID
  gpu_vram:
    gpus: ["0", "GPU-4e9e74b7-4977-f04d-3af3-ccfe5f570e90"]

- name: Publish GPU facts for the worker role
  gpu_vram:
    facts: true

- name: Size the workers from the facts
  ansible.builtin.debug:
    msg: >-
      {{ ansible_facts.comfyume_gpu_count }} GPU(s),
      driver {{ ansible_facts.comfyume_gpu_driver_version }}

- name: Facts on a simulated host without a GPU (CI)
  gpu_vram:
    facts: true
    allow_no_gpu: true
"""

RETURN = r"""
backend:
  description: What answered - C(nvml), C(nvidia-smi), or C(none) on a host without a GPU.
  returned: always
  type: str
  sample: nvml
driver_version:
  description: NVIDIA driver version.
  returned: always
  type: str
  sample: "570.211.01"
cuda_version:
  description: Highest CUDA version the driver supports.
  returned: always
  type: str
  sample: "12.8"
gpu_count:
  description: Number of GPUs selected (all GPUs when O(gpus) is empty).
  returned: always
  type: int
  sample: 8
gpus:
  description: One entry per selected GPU, in index order.
  returned: always
  type: list
  elements: dict
  contains:
    index:
      description: GPU index as the driver numbers it.
      type: int
      sample: 0
    name:
      description: Product name.
      type: str
      sample: NVIDIA H200
    uuid:
      description: GPU UUID.
      type: str
      sample: GPU-a44622e3-2296-6285-0a86-84d0f6c67900
    memory_total_mb:
      description: Total memory in MiB.
      type: int
      sample: 143771
    memory_used_mb:
      description: Used memory in MiB.
      type: int
      sample: 130013
    memory_free_mb:
      description: Free memory in MiB.
      type: int
      sample: 13758
    memory_reserved_mb:
      description: Memory reserved by the driver and firmware in MiB; C(null) where not reported.
      type: int
      sample: 480
    available_mb:
      description: O(safety_margin_mb) taken off C(memory_free_mb), never below 0.
      type: int
      sample: 11710
    utilization_gpu_pct:
      description: Percent of the last sample period a kernel was running.
      type: int
      sample: 100
    utilization_memory_pct:
      description: Percent of the last sample period device memory was read or written.
      type: int
      sample: 37
    temperature_c:
      description: GPU temperature in degrees Celsius.
      type: int
      sample: 41
    processes:
      description: Compute processes on this GPU (empty when O(include_processes=false)).
      type: list
      elements: dict
      contains:
        pid:
          description: Process id (in the host's PID namespace).
          type: int
          sample: 1328667
        name:
          description: Process name, C(null) when the driver cannot see it (another container).
          type: str
          sample: /usr/local/bin/python3.10
        used_memory_mb:
          description: GPU memory the process holds, in MiB; C(null) when not reported.
          type: int
          sample: 130004
total_free_mb:
  description: Sum of C(memory_free_mb) over the selected GPUs.
  returned: always
  type: int
  sample: 85700
gate:
  description: The free-memory gate that was applied.
  returned: always
  type: dict
  contains:
    min_free_mb:
      description: Threshold from O(min_free_mb).
      type: int
      sample: 20000
    safety_margin_mb:
      description: Margin from O(safety_margin_mb).
      type: int
      sample: 2048
    passed:
      description: Whether every selected GPU met the threshold (C(true) when not gating).
      type: bool
      sample: true
    failing:
      description: Indices of the GPUs below the threshold.
      type: list
      elements: int
      sample: []
ansible_facts:
  description: GPU facts for later roles.
  returned: when O(facts=true)
  type: dict
  contains:
    comfyume_gpus:
      description: The RV(gpus) list.
      type: list
      elements: dict
      sample: []
    comfyume_gpu_count:
      description: The RV(gpu_count).
      type: int
      sample: 1
    comfyume_gpu_driver_version:
      description: The RV(driver_version).
      type: str
      sample: "570.211.01"
    comfyume_cuda_version:
      description: The RV(cuda_version).
      type: str
      sample: "12.8"
    comfyume_gpu_backend:
      description: The RV(backend).
      type: str
      sample: nvml
"""

import re  # noqa: E402 - Ansible modules put imports after the documentation
import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:  # nvidia-ml-py is optional on the target; nvidia-smi covers its absence.
    import pynvml

    PYNVML_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - depends on the target
    pynvml = None
    PYNVML_IMPORT_ERROR = "nvidia-ml-py (pynvml) is not installed"

MIB = 1024 * 1024
NO_GPU_PREFIX = "no NVIDIA GPU or driver on this host"

# Fields asked of nvidia-smi. Optional ones are dropped and the query retried when an
# older driver rejects them ("... is not a valid field to query").
SMI_GPU_FIELDS = (
    "index",
    "name",
    "uuid",
    "memory.total",
    "memory.used",
    "memory.free",
    "memory.reserved",
    "utilization.gpu",
    "utilization.memory",
    "temperature.gpu",
    "driver_version",
)
SMI_OPTIONAL_FIELDS = ("memory.reserved",)
SMI_APP_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")

# Header names nvidia-smi prints differ from some query names; map both to one key.
FIELD_ALIASES = {
    "gpu_name": "name",
    "gpu_bus_id": "pci.bus_id",
    "used_memory": "used_gpu_memory",
    "clocks.sm": "clocks.current.sm",
    "clocks.gr": "clocks.current.graphics",
    "clocks.mem": "clocks.current.memory",
}
KNOWN_FIELDS = frozenset(
    set(SMI_GPU_FIELDS)
    | set(SMI_APP_FIELDS)
    | set(FIELD_ALIASES)
    | set(FIELD_ALIASES.values())
    | {
        "count",
        "timestamp",
        "serial",
        "pstate",
        "compute_cap",
        "vbios_version",
        "power.draw",
        "power.limit",
        "pci.bus_id",
        "gpu_serial",
        "process_name",
    }
)
# Columns kept as text even when they look numeric ("575.57" is a version, not a float).
TEXT_FIELDS = frozenset(
    {"name", "uuid", "gpu_uuid", "driver_version", "vbios_version", "pci.bus_id", "process_name"}
)
UNAVAILABLE = ("n/a", "[n/a]", "[not supported]", "not supported", "[not found]", "[unknown error]")


class GpuReadError(Exception):
    """The backend answered but the answer cannot be used."""


class NoGpuError(Exception):
    """No NVIDIA GPU or driver could be reached through this backend."""


# ----------------------------------------------------------------------------------------
# nvidia-smi CSV
# ----------------------------------------------------------------------------------------


def normalize_field(name):
    """Header cell or query name -> one canonical key ("memory.used [MiB]" -> "memory.used")."""
    key = re.sub(r"\s*\[[^\]]*\]\s*$", "", name.strip()).strip().lower()
    return FIELD_ALIASES.get(key, key)


def split_csv_line(line):
    """nvidia-smi separates with ", " and never quotes; names contain no commas."""
    return [cell.strip() for cell in line.split(",")]


def parse_value(text):
    """A CSV cell as int, float or str; units stripped; N/A-style markers as None."""
    cell = text.strip()
    if not cell or cell.lower() in UNAVAILABLE:
        return None
    match = re.match(r"^(-?\d+(?:\.\d+)?)\s*(?:MiB|MHz|W|C|%|KiB|GiB)?$", cell)
    if match:
        number = match.group(1)
        return float(number) if "." in number else int(number)
    return cell


def is_header(cells):
    return any(normalize_field(cell) in KNOWN_FIELDS for cell in cells)


def parse_csv(text, fields=None):
    """Rows of an nvidia-smi CSV as dicts keyed by canonical field names.

    With a header row (``--format=csv``) the header names the columns, whatever order or
    subset of fields was asked for. Without one (``noheader``) ``fields`` must name them.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    first = split_csv_line(lines[0])
    if is_header(first):
        keys = [normalize_field(cell) for cell in first]
        lines = lines[1:]
    elif fields:
        keys = [normalize_field(field) for field in fields]
    else:
        raise GpuReadError("nvidia-smi CSV has no header row and no field list was given")
    rows = []
    for line in lines:
        cells = split_csv_line(line)
        if len(cells) != len(keys):
            raise GpuReadError(
                f"nvidia-smi CSV row has {len(cells)} fields, expected {len(keys)}: {line!r}"
            )
        row = {}
        for key, cell in zip(keys, cells, strict=False):
            value = parse_value(cell)
            row[key] = str(cell) if key in TEXT_FIELDS and value is not None else value
        rows.append(row)
    return rows


def _as_int(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def gpus_from_smi_rows(rows):
    """GPU dicts (the module's RETURN shape, without processes) from parsed query-gpu rows."""
    gpus = []
    for position, row in enumerate(rows):
        total = _as_int(row.get("memory.total"))
        used = _as_int(row.get("memory.used"))
        free = _as_int(row.get("memory.free"))
        reserved = _as_int(row.get("memory.reserved"))
        if free is None and total is not None and used is not None:
            free = max(total - used - (reserved or 0), 0)
        index = _as_int(row.get("index"))
        name = row.get("name")
        uuid = row.get("uuid", row.get("gpu_uuid"))
        gpus.append(
            {
                "index": position if index is None else index,
                "name": None if name is None else str(name),
                "uuid": None if uuid is None else str(uuid),
                "memory_total_mb": total,
                "memory_used_mb": used,
                "memory_free_mb": free,
                "memory_reserved_mb": reserved,
                "utilization_gpu_pct": _as_int(row.get("utilization.gpu")),
                "utilization_memory_pct": _as_int(row.get("utilization.memory")),
                "temperature_c": _as_int(row.get("temperature.gpu")),
                "processes": [],
            }
        )
    return gpus


def processes_from_smi_rows(rows):
    """{gpu_uuid: [process, ...]} from parsed query-compute-apps rows."""
    by_gpu = {}
    for row in rows:
        uuid = row.get("gpu_uuid")
        name = row.get("process_name")
        by_gpu.setdefault(str(uuid), []).append(
            {
                "pid": _as_int(row.get("pid")),
                "name": None if name is None else str(name),
                "used_memory_mb": _as_int(row.get("used_gpu_memory")),
            }
        )
    return by_gpu


def attach_processes(gpus, by_uuid):
    for gpu in gpus:
        gpu["processes"] = list(by_uuid.get(str(gpu["uuid"]), []))
    return gpus


def parse_banner_versions(text):
    """(driver, cuda) from the nvidia-smi banner or ``nvidia-smi -q``; None where absent."""
    driver = re.search(r"Driver Version\s*:?\s*([0-9][0-9.]*)", text)
    cuda = re.search(r"CUDA Version\s*:?\s*([0-9][0-9.]*)", text)
    return (driver.group(1) if driver else None, cuda.group(1) if cuda else None)


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def read_nvidia_smi(run, executable, include_processes=True):
    """Read every GPU with nvidia-smi.

    ``run(argv) -> (rc, stdout, stderr)`` runs a command; the module passes
    AnsibleModule.run_command, tests pass a replay of recorded output.
    """
    fields = list(SMI_GPU_FIELDS)
    while True:
        rc, out, err = run([executable, "--query-gpu=" + ",".join(fields), "--format=csv,nounits"])
        if rc == 0:
            break
        message = first_line(err) or first_line(out) or f"exit status {rc}"
        rejected = [f for f in fields if f in SMI_OPTIONAL_FIELDS and f in (err + out)]
        if rejected and "valid field" in (err + out):
            fields = [f for f in fields if f not in rejected]
            continue
        raise NoGpuError(f"nvidia-smi: {message}")
    rows = parse_csv(out, fields)
    gpus = gpus_from_smi_rows(rows)
    if not gpus:
        raise NoGpuError("nvidia-smi lists no GPU")
    if include_processes:
        rc, out, err = run(
            [executable, "--query-compute-apps=" + ",".join(SMI_APP_FIELDS), "--format=csv,nounits"]
        )
        if rc != 0:
            raise GpuReadError("nvidia-smi --query-compute-apps: %s" % (first_line(err) or rc))
        attach_processes(gpus, processes_from_smi_rows(parse_csv(out, SMI_APP_FIELDS)))
    rc, banner, _err = run([executable])
    driver, cuda = parse_banner_versions(banner if rc == 0 else "")
    queried_driver = rows[0].get("driver_version")
    if queried_driver is not None:
        driver = str(queried_driver)
    return {"backend": "nvidia-smi", "driver_version": driver, "cuda_version": cuda, "gpus": gpus}


# ----------------------------------------------------------------------------------------
# NVML
# ----------------------------------------------------------------------------------------


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _mib(value):
    return None if value is None else int(value) // MIB


def cuda_version_from_int(value):
    """NVML's CUDA driver version integer (12080) as "12.8"."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _optional(call, *args):
    """An NVML reading some GPUs or drivers do not support: None instead of an error."""
    try:
        return call(*args)
    except Exception:
        return None


def nvml_memory(nvml, handle):
    """(total, used, free, reserved) in MiB; reserved is None where only v1 is available."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return (_mib(info.total), _mib(info.used), _mib(info.free), _mib(info.reserved))
        except Exception:
            pass
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return (_mib(info.total), _mib(info.used), _mib(info.free), None)


def nvml_processes(nvml, handle):
    procs = _optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    result = []
    for proc in procs:
        used = getattr(proc, "usedGpuMemory", None)
        name = _optional(nvml.nvmlSystemGetProcessName, proc.pid)
        result.append(
            {
                "pid": int(proc.pid),
                "name": None if not name else _text(name),
                "used_memory_mb": _mib(used) if isinstance(used, int) else None,
            }
        )
    return result


def read_nvml(nvml, include_processes=True):
    """Read every GPU through an NVML binding (the pynvml module, or a fake in tests)."""
    try:
        nvml.nvmlInit()
    except Exception as exc:
        raise NoGpuError("NVML: %s" % (str(exc) or type(exc).__name__)) from exc
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise NoGpuError("NVML lists no GPU")
        gpus = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            total, used, free, reserved = nvml_memory(nvml, handle)
            util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            temp = _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            gpus.append(
                {
                    "index": index,
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                    "memory_total_mb": total,
                    "memory_used_mb": used,
                    "memory_free_mb": free,
                    "memory_reserved_mb": reserved,
                    "utilization_gpu_pct": None if util is None else int(util.gpu),
                    "utilization_memory_pct": None if util is None else int(util.memory),
                    "temperature_c": None if temp is None else int(temp),
                    "processes": nvml_processes(nvml, handle) if include_processes else [],
                }
            )
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_int = _optional(nvml.nvmlSystemGetCudaDriverVersion_v2)
        if cuda_int is None:
            cuda_int = _optional(nvml.nvmlSystemGetCudaDriverVersion)
        cuda = None if cuda_int is None else cuda_version_from_int(int(cuda_int))
        return {"backend": "nvml", "driver_version": driver, "cuda_version": cuda, "gpus": gpus}
    finally:
        _optional(nvml.nvmlShutdown)


# ----------------------------------------------------------------------------------------
# Selection, gate, facts
# ----------------------------------------------------------------------------------------


def select_gpus(gpus, wanted):
    """The GPUs named in ``wanted`` (indices or UUIDs), in index order; all when empty."""
    if not wanted:
        return list(gpus)
    chosen = []
    for selector in wanted:
        key = str(selector).strip()
        match = [
            gpu
            for gpu in gpus
            if key == str(gpu["index"]) or (gpu["uuid"] and key.lower() == gpu["uuid"].lower())
        ]
        if not match:
            present = ", ".join("{} ({})".format(gpu["index"], gpu["uuid"]) for gpu in gpus)
            raise GpuReadError(f"no GPU matches {key!r}; this host has: {present}")
        for gpu in match:
            if gpu not in chosen:
                chosen.append(gpu)
    return sorted(chosen, key=lambda gpu: gpu["index"])


def apply_margin(gpus, safety_margin_mb):
    for gpu in gpus:
        free = gpu["memory_free_mb"]
        gpu["available_mb"] = None if free is None else max(free - safety_margin_mb, 0)
    return gpus


def check_gate(gpus, min_free_mb, safety_margin_mb):
    """(gate dict, failure message or None). Every figure the message quotes is in MiB."""
    gate = {
        "min_free_mb": min_free_mb,
        "safety_margin_mb": safety_margin_mb,
        "passed": True,
        "failing": [],
    }
    if min_free_mb <= 0:
        return gate, None
    if not gpus:
        gate["passed"] = False
        return gate, f"min_free_mb={min_free_mb} MiB asked for, but no GPU was found to check"
    parts = []
    for gpu in gpus:
        label = f"GPU {gpu['index']}" + (f" ({gpu['name']})" if gpu["name"] else "")
        free = gpu["memory_free_mb"]
        if free is None:
            gate["failing"].append(gpu["index"])
            parts.append(f"{label}: free memory unknown")
            continue
        available = max(free - safety_margin_mb, 0)
        if available < min_free_mb:
            gate["failing"].append(gpu["index"])
            parts.append(
                f"{label}: {free} MiB free - {safety_margin_mb} MiB"
                f" margin = {available} MiB available, {min_free_mb - available} MiB short"
            )
    if not parts:
        return gate, None
    gate["passed"] = False
    return gate, (
        f"GPU memory below min_free_mb={min_free_mb} MiB on {len(parts)} of {len(gpus)} "
        f"GPU(s): {'; '.join(parts)}"
    )


def build_facts(reading):
    return {
        "comfyume_gpus": reading["gpus"],
        "comfyume_gpu_count": len(reading["gpus"]),
        "comfyume_gpu_driver_version": reading["driver_version"],
        "comfyume_cuda_version": reading["cuda_version"],
        "comfyume_gpu_backend": reading["backend"],
    }


def read_gpus(backend, nvml, run_smi, include_processes):
    """Reading from the chosen backend; with ``auto`` NVML first, then nvidia-smi.

    ``run_smi`` is a callable taking ``include_processes`` and returning a reading, or
    None when no nvidia-smi executable exists. Raises NoGpuError with every reason tried.
    """
    reasons = []
    if backend in ("auto", "nvml"):
        if nvml is None:
            reasons.append(f"NVML: {PYNVML_IMPORT_ERROR}")
        else:
            try:
                return read_nvml(nvml, include_processes)
            except NoGpuError as exc:
                reasons.append(str(exc))
    if backend in ("auto", "nvidia-smi"):
        try:
            reading = run_smi(include_processes)
        except NoGpuError as exc:
            reasons.append(str(exc))
        else:
            if reading is not None:
                return reading
            reasons.append("nvidia-smi: not found")
    raise NoGpuError("; ".join(reasons))


def one_line(text):
    return " ".join(str(text).split())


ARGUMENT_SPEC = {
    "gpus": {"type": "list", "elements": "str", "default": []},
    "min_free_mb": {"type": "int", "default": 0},
    "safety_margin_mb": {"type": "int", "default": 0},
    "facts": {"type": "bool", "default": False},
    "allow_no_gpu": {"type": "bool", "default": False},
    "backend": {"type": "str", "default": "auto", "choices": ["auto", "nvml", "nvidia-smi"]},
    "include_processes": {"type": "bool", "default": True},
    "nvidia_smi_path": {"type": "str", "default": "nvidia-smi"},
}


def run_module():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    for name in ("min_free_mb", "safety_margin_mb"):
        if params[name] < 0:
            module.fail_json(msg=f"{name} must be 0 or more, got {params[name]}")

    def run(argv):
        return module.run_command(argv, environ_update={"LC_ALL": "C"})

    def run_smi(include_processes):
        executable = module.get_bin_path(params["nvidia_smi_path"], required=False)
        if executable is None:
            return None
        return read_nvidia_smi(run, executable, include_processes)

    result = {"changed": False}
    try:
        reading = read_gpus(params["backend"], pynvml, run_smi, params["include_processes"])
    except NoGpuError as exc:
        if not params["allow_no_gpu"]:
            module.fail_json(msg=one_line(f"{NO_GPU_PREFIX}: {exc}"), **result)
        reading = {"backend": "none", "driver_version": None, "cuda_version": None, "gpus": []}
        result["msg"] = one_line(f"{NO_GPU_PREFIX}: {exc}")
    except GpuReadError as exc:
        module.fail_json(msg=one_line(f"cannot read GPU memory: {exc}"), **result)
    except Exception as exc:
        module.fail_json(
            msg=one_line(f"cannot read GPU memory: {type(exc).__name__}: {exc}"),
            exception=traceback.format_exc(),
            **result,
        )

    try:
        selected = select_gpus(reading["gpus"], params["gpus"])
    except GpuReadError as exc:
        module.fail_json(**dict(result, msg=one_line(exc)))
    apply_margin(selected, params["safety_margin_mb"])
    reading = dict(reading, gpus=selected)
    gate, failure = check_gate(selected, params["min_free_mb"], params["safety_margin_mb"])
    result.update(
        backend=reading["backend"],
        driver_version=reading["driver_version"],
        cuda_version=reading["cuda_version"],
        gpu_count=len(selected),
        gpus=selected,
        total_free_mb=sum(gpu["memory_free_mb"] or 0 for gpu in selected),
        gate=gate,
    )
    if params["facts"]:
        result["ansible_facts"] = build_facts(reading)
    if failure:
        module.fail_json(**dict(result, msg=one_line(failure)))
    module.exit_json(**result)


def main():
    run_module()


if __name__ == "__main__":
    main()
