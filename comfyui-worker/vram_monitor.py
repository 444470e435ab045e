"""Command line view of the worker's VRAM logic, with JSON output for scripts and operators.

  python3 vram_monitor.py stats                  # the GPU's memory (GPU_INDEX or --gpu)
  python3 vram_monitor.py estimate job.json      # what a job needs (file or - for stdin)
  python3 vram_monitor.py check job.json         # would the job fit now? exit 0 yes, 1 no
  python3 vram_monitor.py check --required 12000 # same for a number of MiB

It uses the same measurements (NVML, then nvidia-smi) and estimates (metadata.estimated_vram,
VRAM_MODEL_TABLE, VRAM_DEFAULT_MB + VRAM_MARGIN_MB) as the worker. Exit code 2 means the GPU could
not be read or the input was bad.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import vram
from config import Config, ConfigError


def _print(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _load_job(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the job must be a JSON object")
    # Accept a bare workflow as well as a whole job.
    if (
        doc
        and "workflow" not in doc
        and all(isinstance(v, dict) and "class_type" in v for v in doc.values())
    ):
        doc = {"workflow": doc}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=None, help="GPU index (default: GPU_INDEX)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="memory of the GPU as JSON")
    est = sub.add_parser("estimate", help="VRAM a job needs")
    est.add_argument("job", help="job or workflow JSON file, - for stdin")
    chk = sub.add_parser("check", help="does a job (or --required MiB) fit now?")
    chk.add_argument("job", nargs="?", help="job or workflow JSON file, - for stdin")
    chk.add_argument("--required", type=int, help="MiB needed, instead of a job")
    args = parser.parse_args(argv)

    try:
        cfg = Config.from_env({k: v for k, v in os.environ.items() if k != "COMFYUI_START"})
        table = vram.load_table(cfg.vram_table)
    except (ConfigError, OSError, ValueError) as exc:
        _print({"error": str(exc)})
        return 2
    gpu = cfg.gpu_index if args.gpu is None else args.gpu

    need: vram.Estimate | None = None
    if args.command in ("estimate", "check") and getattr(args, "job", None):
        try:
            need = vram.estimate(
                _load_job(args.job), table, cfg.vram_default_mb, cfg.vram_margin_mb
            )
        except (OSError, ValueError) as exc:
            _print({"error": f"cannot read the job: {exc}"})
            return 2
    if args.command == "estimate":
        assert need is not None
        _print(need.as_dict())
        return 0

    probe = vram.VramProbe(gpu)
    reading = probe.read()
    if args.command == "stats":
        if reading is None:
            _print({"gpu_index": gpu, "available": False, "error": probe.last_error})
            return 2
        _print({"available": True, **reading.as_dict()})
        return 0

    if need is None and args.required is None:
        parser.error("check needs a job file or --required MiB")
    required = args.required if args.required is not None else need.required_mb  # type: ignore[union-attr]
    doc: dict[str, Any] = {"gpu_index": gpu, "required_mb": required}
    if need is not None:
        doc["estimate"] = need.as_dict()
    if reading is None:
        _print({**doc, "fits": None, "error": probe.last_error})
        return 2
    doc.update(
        free_mb=reading.free_mb,
        total_mb=reading.total_mb,
        fits=reading.free_mb >= required,
        can_ever_fit=reading.total_mb >= required,
        source=reading.source,
    )
    _print(doc)
    return 0 if doc["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
