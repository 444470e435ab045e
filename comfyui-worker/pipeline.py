"""A job's life as a pipeline: validate, admit, stage inputs, run, collect, deliver, report.

The Worker drives the stages in order over one JobRun, which carries what each stage produced.
A stage returns False when the job leaves the pipeline without a result of its own (put back in
the queue, cancelled, or stopped), and raises JobFailure to fail it. Clean-ups that a stage
registers (its input folder, ComfyUI's history entry) run whatever happened, newest first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from comfy_client import Outcome
from inputs import InputRef
from jobs import ClaimedJob, JobFailure

log = logging.getLogger("comfyui_worker.pipeline")


@dataclass
class JobRun:
    """One job on its way through the stages."""

    job: ClaimedJob
    workflow: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputRef] = field(default_factory=list)
    outcome: Outcome | None = None
    folder: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


Stage = tuple[str, Callable[[JobRun], Awaitable[bool]]]


async def drive(stages: Sequence[Stage], run: JobRun) -> bool:
    """Run the stages in order; True when every stage ran to its end."""
    try:
        for name, stage in stages:
            started = time.monotonic()
            proceed = await stage(run)
            run.timings_ms[name] = round((time.monotonic() - started) * 1000, 1)
            if not proceed:
                log.debug("job left the pipeline at %s", name)
                return False
        return True
    finally:
        for cleanup in reversed(run.cleanups):
            try:
                await cleanup()
            except Exception:  # a clean-up must not hide the job's own outcome
                log.exception("clean-up after the job failed")


def scrub(failure: JobFailure, replacements: Sequence[tuple[str, str]]) -> JobFailure:
    """The failure with the worker's own paths replaced by the names the participant used."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            for old, new in replacements:
                if old:
                    value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    scrubbed = JobFailure(failure.kind, clean(failure.message), clean(failure.details))
    with contextlib.suppress(AttributeError):
        scrubbed.__cause__ = failure.__cause__
    return scrubbed
