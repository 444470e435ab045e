"""Helper tasks that never die silently.

The worker's helpers (heartbeat, health file, Redis listener, ...) are long-running loops. An
exception that escaped one of them used to end that task without a word, leaving a worker whose
heartbeat stopped or whose listener was gone. `keep_running` logs every failure with its
traceback, starts the loop again after a capped backoff, and gives up (raising HelperFailed) when
the loop keeps failing, so the worker can stop and exit non-zero instead of limping on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("comfyui_worker.tasks")

# A helper that fails this many times, each within STABLE_AFTER seconds of its (re)start, is
# given up on.
MAX_QUICK_FAILURES = 5
STABLE_AFTER = 60.0


class HelperFailed(Exception):
    """A helper task kept failing; the worker cannot carry on safely without it."""


async def keep_running(
    name: str,
    loop: Callable[[], Awaitable[None]],
    max_failures: int = MAX_QUICK_FAILURES,
    backoff_max: float = 30.0,
) -> None:
    """Run `loop()` until it returns; restart it after an unexpected exception."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = 1 if time.monotonic() - started >= STABLE_AFTER else failures + 1
            if failures >= max_failures:
                log.error("the %s task failed %d times in a row; giving up", name, failures)
                raise HelperFailed(
                    f"the {name} task failed {failures} times in a row "
                    f"(last: {type(exc).__name__}: {exc})"
                ) from exc
            delay = min(0.5 * 2 ** (failures - 1), backoff_max)
            log.exception("the %s task failed; starting it again in %.1f s", name, delay)
            await asyncio.sleep(delay)
