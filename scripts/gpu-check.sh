#!/usr/bin/env bash
# One run on a machine with a real NVIDIA GPU (a lent H100/H200, a Verda host):
#   1. calls the gpu_vram module ad hoc over a local connection,
#   2. runs comfyui-worker/vram_monitor.py stats (when it exists),
#   3. checks both against nvidia-smi (totals exact, used/free within a tolerance),
#   4. times NVML reads against an nvidia-smi subprocess and prints the medians and ratio.
# Everything is printed; the exit status is non-zero when a reading disagrees.
#
#   sudo scripts/gpu-check.sh                 # venv in .gpu-check-venv, packages from PyPI
#   GPU_CHECK_WHEELS=/path/to/wheels scripts/gpu-check.sh   # offline: pip --no-index
#
# Settings (environment): GPU_CHECK_VENV (.gpu-check-venv), GPU_CHECK_WHEELS (unset),
# GPU_CHECK_TOLERANCE_MB (256: memory moves between two reads), GPU_CHECK_NVML_CALLS (500),
# GPU_CHECK_SMI_CALLS (30), GPU_CHECK_MONITOR (comfyui-worker/vram_monitor.py), PYTHON (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[gpu-check] %s\n' "$*" >&2; }

venv="${GPU_CHECK_VENV:-.gpu-check-venv}"
py="${PYTHON:-python3}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  log "nvidia-smi is not on PATH: this script needs a machine with an NVIDIA driver"
  exit 2
fi

if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv with $("$py" --version 2>&1)"
  "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import ansible, pynvml' 2>/dev/null; then
  if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    log "installing ansible-core and nvidia-ml-py from $GPU_CHECK_WHEELS"
    "$venv/bin/python" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" \
      ansible-core nvidia-ml-py
  else
    log "installing ansible-core and nvidia-ml-py from PyPI"
    "$venv/bin/python" -m pip install -q ansible-core nvidia-ml-py
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "gpu_vram ad hoc (localhost, local connection)"
set +e
ANSIBLE_LIBRARY="$PWD/library" ANSIBLE_LOAD_CALLBACK_PLUGINS=1 \
  ANSIBLE_STDOUT_CALLBACK=json ANSIBLE_LOCALHOST_WARNING=0 ANSIBLE_INVENTORY_UNPARSED_WARNING=0 \
  "$venv/bin/ansible" localhost -i localhost, -c local \
  -e "ansible_python_interpreter=$PWD/$venv/bin/python" \
  -m gpu_vram -a 'facts=true' >"$work/module.json" 2>"$work/module.err"
module_rc=$?
set -e
if ((module_rc != 0)); then
  log "gpu_vram exited $module_rc"
  cat "$work/module.err" >&2
fi

monitor="${GPU_CHECK_MONITOR:-comfyui-worker/vram_monitor.py}"
if [[ -f "$monitor" ]]; then
  log "vram_monitor.py stats"
  set +e
  "$venv/bin/python" "$monitor" stats >"$work/monitor.json" 2>"$work/monitor.err"
  monitor_rc=$?
  set -e
  if ((monitor_rc != 0)); then
    log "vram_monitor.py stats exited $monitor_rc"
    cat "$work/monitor.err" >&2
  fi
else
  log "$monitor not found: its comparison is skipped"
  : >"$work/monitor.json"
fi

"$venv/bin/python" - "$work/module.json" "$work/monitor.json" <<'PY'
"""Compare the readings with nvidia-smi, then time NVML against an nvidia-smi subprocess."""

import json
import os
import statistics
import subprocess
import sys
import time

import pynvml

TOL = int(os.environ.get("GPU_CHECK_TOLERANCE_MB", "256"))
NVML_CALLS = int(os.environ.get("GPU_CHECK_NVML_CALLS", "500"))
SMI_CALLS = int(os.environ.get("GPU_CHECK_SMI_CALLS", "30"))
SMI = ["nvidia-smi", "--query-gpu=index,uuid,memory.total,memory.used,memory.free",
       "--format=csv,noheader,nounits"]
problems = []


def smi_now():
    out = subprocess.run(SMI, check=True, capture_output=True, text=True).stdout
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return {r[1]: {"index": int(r[0]), "total": int(r[2]), "used": int(r[3]), "free": int(r[4])}
            for r in rows}


def compare(source, readings, reference):
    """readings: {uuid: {"total", "used", "free"}} in MiB."""
    if set(readings) != set(reference):
        problems.append(f"{source}: GPUs {sorted(readings)} != nvidia-smi {sorted(reference)}")
    for uuid, ref in sorted(reference.items(), key=lambda kv: kv[1]["index"]):
        got = readings.get(uuid)
        if got is None:
            continue
        line = [f"{source:<14} GPU {ref['index']}"]
        for key in ("total", "used", "free"):
            mine, theirs = got.get(key), ref[key]
            limit = 0 if key == "total" else TOL
            ok = mine is not None and abs(mine - theirs) <= limit
            line.append(f"{key} {mine} vs {theirs} {'ok' if ok else 'DIFFERS'}")
            if not ok:
                problems.append(f"{source} GPU {ref['index']} {key}: {mine} vs nvidia-smi {theirs}"
                                f" (tolerance {limit} MiB)")
        print("  ".join(line))


reference = smi_now()
print(f"nvidia-smi sees {len(reference)} GPU(s)")

# 1. the module
try:
    report = json.load(open(sys.argv[1]))
    result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
except (OSError, ValueError, KeyError, IndexError) as exc:
    result = {"failed": True, "msg": f"no JSON result from ansible: {exc}"}
if result.get("failed"):
    problems.append(f"gpu_vram failed: {result.get('msg')}")
else:
    print(f"gpu_vram: backend {result['backend']}, driver {result['driver_version']}, "
          f"CUDA {result['cuda_version']}, {result['gpu_count']} GPU(s)")
    compare("gpu_vram", {g["uuid"]: {"total": g["memory_total_mb"],
                                     "used": g["memory_used_mb"],
                                     "free": g["memory_free_mb"]} for g in result["gpus"]},
            reference)
    if result["backend"] != "nvml":
        problems.append(f"gpu_vram used {result['backend']}, expected nvml on this machine")

# 2. vram_monitor.py stats (schema read loosely: any list of per-GPU dicts with a UUID or
# index and total/used/free figures, in MiB or bytes)
text = open(sys.argv[2]).read().strip()
if text:
    try:
        stats = json.loads(text)
    except ValueError as exc:
        problems.append(f"vram_monitor.py stats did not print JSON: {exc}")
        stats = None

    def gpu_dicts(node):
        if isinstance(node, dict):
            if any("free" in k for k in node) and any("total" in k for k in node):
                yield node
            for value in node.values():
                yield from gpu_dicts(value)
        elif isinstance(node, list):
            for value in node:
                yield from gpu_dicts(value)

    def figure(entry, word):
        for key, value in entry.items():
            if word in key.lower() and isinstance(value, (int, float)) and "pct" not in key:
                return int(value // (1024 * 1024)) if value > 10**7 else int(value)
        return None

    by_index = {ref["index"]: uuid for uuid, ref in reference.items()}
    readings = {}
    for entry in gpu_dicts(stats) if stats is not None else ():
        uuid = entry.get("uuid") or by_index.get(entry.get("index", entry.get("gpu")))
        if uuid:
            readings[uuid] = {w: figure(entry, w) for w in ("total", "used", "free")}
    if stats is not None and not readings:
        problems.append("vram_monitor.py stats: no per-GPU total/free figures found")
    elif readings:
        compare("vram_monitor", readings, reference)

# 3. cost of a reading: NVML (memory of every GPU) against one nvidia-smi subprocess
pynvml.nvmlInit()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
nvml_times = []
for _ in range(NVML_CALLS):
    start = time.perf_counter()
    for handle in handles:
        pynvml.nvmlDeviceGetMemoryInfo(handle)
    nvml_times.append(time.perf_counter() - start)
pynvml.nvmlShutdown()
smi_times = []
for _ in range(SMI_CALLS):
    start = time.perf_counter()
    subprocess.run(SMI, check=True, capture_output=True)
    smi_times.append(time.perf_counter() - start)
nvml_ms = statistics.median(nvml_times) * 1000
smi_ms = statistics.median(smi_times) * 1000
print(f"NVML memory read of {len(handles)} GPU(s): median {nvml_ms:.4f} ms over {NVML_CALLS} calls")
print(f"nvidia-smi subprocess:              median {smi_ms:.2f} ms over {SMI_CALLS} calls")
print(f"ratio nvidia-smi / NVML: {smi_ms / nvml_ms:.0f}x")

if problems:
    print("DISAGREEMENTS:")
    for problem in problems:
        print(f"  - {problem}")
    sys.exit(1)
print("all readings agree with nvidia-smi")
PY
