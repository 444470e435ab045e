"""Container HEALTHCHECK: healthy only when both the worker loop and ComfyUI are alive.

The worker writes HEALTH_FILE every HEALTH_INTERVAL seconds from its event loop, and stops when
its main loop ends, so a stale file means a dead or stuck worker. ComfyUI must answer
/system_stats. Standard library only, so the check works whatever the worker's state.
Exit 0 healthy, 1 unhealthy (with the reason on stdout, which `docker inspect` shows).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request


def check(env: dict[str, str]) -> str | None:
    """The reason the container is unhealthy, or None."""
    path = env.get("HEALTH_FILE") or "/tmp/comfyui-worker.health"
    max_age = float(env.get("HEALTH_MAX_AGE") or 60)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        age = time.time() - float(doc["ts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"worker loop: no health file ({exc})"
    if doc.get("out_of_service"):
        return f"out of service: {doc['out_of_service']}"
    if age > max_age:
        return f"worker loop: health file is {age:.0f} s old (limit {max_age:g} s)"
    url = (env.get("COMFYUI_URL") or "http://127.0.0.1:8188").rstrip("/") + "/system_stats"
    try:
        with urllib.request.urlopen(url, timeout=float(env.get("HEALTH_COMFYUI_TIMEOUT") or 5)):
            pass
    except OSError as exc:
        return f"ComfyUI: {url} does not answer ({exc})"
    return None


def main() -> int:
    reason = check(dict(os.environ))
    if reason:
        print(f"unhealthy: {reason}")
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
