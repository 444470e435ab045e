"""The module loaded as a plain Python module, and the recorded fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_PATH = REPO / "library" / "gpu_vram.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_vram", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_vram", module)
    spec.loader.exec_module(module)
    return module


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")
