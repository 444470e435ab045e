"""The gpu_vram module as a fixture for every test here."""

from __future__ import annotations

import pytest
from vram_helpers import load_module


@pytest.fixture(scope="session")
def gv():
    return load_module()
