"""The switch for the GPU assertions (shared with the default scenario's tests)."""

from __future__ import annotations

import os


def gpu_enabled(host) -> bool:
    """True when COMFYUME_GPU_ENABLED=1 or the host var comfyume_gpu_enabled is true."""
    if os.environ.get("COMFYUME_GPU_ENABLED", "").lower() in ("1", "true", "yes"):
        return True
    try:
        return bool(host.ansible.get_variables().get("comfyume_gpu_enabled", False))
    except Exception:  # no Ansible inventory behind the host (e.g. --collect-only)
        return False
