"""Logging that a person can read and a machine can parse.

Every line carries the worker id and the job id (a context variable, so concurrent tasks keep
their own), and LOG_FORMAT=json turns each line into one JSON object. StateLog exists because
an unreachable dependency must produce one line when it goes down and one when it comes back,
not one per retry.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="-")
_worker_id = "-"

log = logging.getLogger("comfyui_worker")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.worker_id = _worker_id
        record.job_id = getattr(record, "job_id", None) or job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the fields log shippers expect."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "worker_id": record.worker_id,  # type: ignore[attr-defined]
            "job_id": record.job_id,  # type: ignore[attr-defined]
            "msg": record.getMessage(),
            "logger": record.name,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s worker=%(worker_id)s job=%(job_id)s %(message)s"


def setup(worker_id: str, fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger once for the process (worker.py calls it at start)."""
    global _worker_id
    _worker_id = worker_id
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter (aiohttp access logs, redis retries) is not ours to print.
    for noisy in ("aiohttp", "redis", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StateLog:
    """Logs a dependency's state only when it changes, so retries stay silent."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._states: dict[str, str] = {}

    def set(self, what: str, state: str, detail: str = "", level: int = logging.INFO) -> bool:
        """Record the state; returns True (and logs) only on a change."""
        if self._states.get(what) == state:
            return False
        previous = self._states.get(what)
        self._states[what] = state
        if previous is None and state == "up":
            self._logger.info("%s is up", what)
        else:
            suffix = f": {detail}" if detail else ""
            self._logger.log(level, "%s is %s%s", what, state, suffix)
        return True

    def get(self, what: str) -> str | None:
        return self._states.get(what)
