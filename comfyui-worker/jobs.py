"""The job as the worker sees it, and the narrow interface every job source implements.

Both sources (the platform's Redis, the queue-manager's HTTP API) hand out ClaimedJob objects
and take results back through the same few calls, so the main loop never knows which is in use
and tests can drive either against real local servers.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

SAFE_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
ERROR_MAX_CHARS = 10000


def utc_now_iso() -> str:
    """ISO-8601 UTC with microseconds, the form the queue-manager writes."""
    return datetime.now(timezone.utc).isoformat()


def iso_to_unix(value: Any) -> float | None:
    """Parses the platform's ISO timestamps (naive ones are UTC); None when unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def pending_score(doc: dict[str, Any]) -> float:
    """The queue's score for a job: priority * 1e6 + created_at (CONTRACTS.md §1)."""
    priority = doc.get("priority", 2)
    if not isinstance(priority, (int, float)) or isinstance(priority, bool):
        priority = 2
    created = iso_to_unix(doc.get("created_at")) or time.time()
    return priority * 1_000_000 + created


def new_job_record(
    job_id: str,
    user_id: Any,
    workflow: Any,
    priority: int = 2,
    created_at: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pending job in the contract's shape (CONTRACTS.md §1), as the queue-manager stores it.

    The one definition of that shape here: the worker uses it for records it must rebuild, the
    demo script, the tests and the benchmark use it to queue jobs as the platform does.
    """
    return {
        "id": job_id,
        "user_id": user_id,
        "workflow": workflow,
        "status": "pending",
        "priority": priority,
        "created_at": created_at,
        "started_at": None,
        "completed_at": None,
        "worker_id": None,
        "result": None,
        "error": None,
        "metadata": metadata or {},
    }


def is_safe_segment(value: Any) -> bool:
    """True for ids usable as one directory name: never '..', '/', empty, NUL or absolute."""
    return isinstance(value, str) and bool(SAFE_SEGMENT_RE.match(value))


class JobFailure(Exception):
    """A job-level failure: the job is reported failed and the worker carries on.

    `kind` is a short machine-readable label (node_errors, execution_error, out_of_memory,
    timeout, invalid_job, vram, outputs, comfyui); `details` keeps structured data such as
    ComfyUI's node_errors so the platform can show them as they came.
    """

    def __init__(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details or {}

    def result(self) -> dict[str, Any]:
        return {"error_kind": self.kind, **self.details}


@dataclass
class ClaimedJob:
    """A job this worker now owns; `doc` is the platform's JSON, or None when it was unparsable."""

    id: str
    doc: dict[str, Any] | None
    raw_size: int
    score: float | None = None
    invalid: str | None = None
    claimed_at: float = field(default_factory=time.monotonic)
    prompt_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def user_id(self) -> Any:
        return (self.doc or {}).get("user_id")

    @property
    def workflow(self) -> Any:
        return (self.doc or {}).get("workflow")

    @property
    def metadata(self) -> dict[str, Any]:
        meta = (self.doc or {}).get("metadata")
        return meta if isinstance(meta, dict) else {}


def validate_job(job: ClaimedJob, max_bytes: int) -> None:
    """Raises JobFailure(invalid_job) for anything that must not reach ComfyUI or the disk."""
    if job.invalid:
        raise JobFailure("invalid_job", job.invalid)
    if job.raw_size > max_bytes:
        raise JobFailure(
            "invalid_job",
            f"job payload is {job.raw_size} bytes, over the limit of {max_bytes} "
            "(WORKER_MAX_JOB_BYTES)",
        )
    if not isinstance(job.doc, dict):
        raise JobFailure("invalid_job", "job JSON is not an object")
    if not is_safe_segment(job.id):
        raise JobFailure("invalid_job", f"job id {job.id!r} is not a safe path segment")
    if not is_safe_segment(job.user_id):
        raise JobFailure(
            "invalid_job",
            f"user_id {job.user_id!r} is not a safe path segment "
            "(allowed: 1-100 of A-Z a-z 0-9 _ -)",
        )
    workflow = job.workflow
    if workflow is None:
        raise JobFailure("invalid_job", "job has no workflow")
    if not isinstance(workflow, dict):
        raise JobFailure(
            "invalid_job", f"workflow must be a JSON object, got {type(workflow).__name__}"
        )
    if not workflow:
        raise JobFailure("invalid_job", "workflow is empty")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise JobFailure(
                "invalid_job",
                f"workflow node {node_id!r} is not an object with a class_type "
                "(is this the UI format instead of the API format?)",
            )


def clip_error(message: str) -> str:
    """The platform accepts 1..10000 characters of error text."""
    message = message or "failed"
    if len(message) <= ERROR_MAX_CHARS:
        return message
    return message[: ERROR_MAX_CHARS - 15] + " ...[truncated]"


class SourceUnavailable(Exception):
    """The job source (Redis or the queue-manager) cannot be reached right now."""


class JobSource(Protocol):
    """What the main loop needs from wherever jobs come from."""

    name: str

    async def start(self) -> None:
        """Connect and start any listeners; must not raise when the source is down."""

    async def close(self) -> None: ...

    async def recover(self) -> list[str]:
        """Put back jobs a previous run of this worker left running; returns their ids."""

    async def claim(self) -> ClaimedJob | None:
        """Atomically take the next job and record it running under this worker."""

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a job may be waiting, or after `timeout` seconds at the latest."""

    async def heartbeat(self, status: dict[str, Any]) -> None:
        """Refresh liveness and publish the worker's status record."""

    async def complete(self, job: ClaimedJob, result: dict[str, Any]) -> str:
        """Record success; returns 'ok', 'cancelled' or 'stale' (no longer ours)."""

    async def fail(self, job: ClaimedJob, error: str, details: dict[str, Any]) -> str:
        """Record failure with a readable error and structured details."""

    async def requeue(self, job: ClaimedJob, reason: str) -> bool:
        """Put the job back with its original score; False when the source cannot."""

    async def retry(self, job: ClaimedJob, reason: str, delay: float) -> str:
        """Put back, counted as an attempt and deferred by `delay` s: 'requeued', 'failed' (at
        WORKER_MAX_ATTEMPTS), 'cancelled', 'stale', or 'unsupported' (the HTTP API)."""

    async def reap_orphans(self, grace: float) -> list[tuple[str, str]]:
        """Take over running jobs of workers whose heartbeat has been gone for `grace` s."""

    async def is_cancelled(self, job: ClaimedJob) -> bool:
        """True when the platform cancelled (or deleted) the job since it was claimed."""

    async def mark_cancelled(self, job: ClaimedJob) -> None:
        """Take a cancelled job off the running set, leaving its cancelled status."""

    def cancel_hint(self) -> Any:
        """An asyncio.Event set when an event suggests a cancellation check is due."""

    def helpers(self) -> list[Any]:
        """The source's own long-running asyncio tasks (none for some sources)."""
