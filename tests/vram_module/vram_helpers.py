"""The module loaded as a plain Python module, and the recorded fixtures."""

from __future__ import annotations

from pathlib import Path

import localplay

MODULE_PATH = localplay.REPO / "library" / "gpu_vram.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_module():
    return localplay.load_module("gpu_vram", MODULE_PATH)


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")
