"""Container HEALTHCHECK: healthy only when both the worker loop and ComfyUI are alive.

The worker writes HEALTH_FILE every HEALTH_INTERVAL seconds from its event loop, and stops when
its main loop ends, so a stale file means a dead or stuck worker. ComfyUI must answer
/system_stats. Standard library only, so the check works whatever the worker's state.
Exit 0 healthy, 1 unhealthy (with the reason on stdout, which `docker inspect` shows).

A healthy worker also says what its loop is doing (`healthy; idle`, `healthy; running`):
`healthy; queue unreachable` is a live container that takes jobs again once its queue answers,
and the play warns about it instead of calling the worker ready.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

# The worker's states (worker.py) as people read them; any other state is printed as it is.
STATE_WORDS = {"queue_unreachable": "queue unreachable"}


def check(env: dict[str, str]) -> tuple[str | None, str]:
    """The reason the container is unhealthy (or None), and the worker loop's state."""
    path = env.get("HEALTH_FILE") or "/tmp/comfyui-worker.health"
    max_age = float(env.get("HEALTH_MAX_AGE") or 60)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        age = time.time() - float(doc["ts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"worker loop: no health file ({exc})", ""
    state = str(doc.get("state") or "unknown")
    if doc.get("out_of_service"):
        return f"out of service: {doc['out_of_service']}", state
    if age > max_age:
        return f"worker loop: health file is {age:.0f} s old (limit {max_age:g} s)", state
    url = (env.get("COMFYUI_URL") or "http://127.0.0.1:8188").rstrip("/") + "/system_stats"
    try:
        with urllib.request.urlopen(url, timeout=float(env.get("HEALTH_COMFYUI_TIMEOUT") or 5)):
            pass
    except OSError as exc:
        return f"ComfyUI: {url} does not answer ({exc})", state
    return None, state


def main() -> int:
    reason, state = check(dict(os.environ))
    if reason:
        print(f"unhealthy: {reason}")
        return 1
    print(f"healthy; {STATE_WORDS.get(state, state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
