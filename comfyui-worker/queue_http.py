"""Job source using the queue-manager's HTTP API (CONTRACTS.md §1), chosen by QUEUE_SOURCE=http.

For hosts that may not reach Redis. The API is narrower than Redis: the heartbeat is refreshed
only by asking for a job, there is no way to put a job back, and no event stream the worker can
rely on, so this source polls every HTTP_POLL_INTERVAL and the worker waits on VRAM instead of
requeueing. Bodies follow the contract: `{"result": ...}` and `{"error": "..."}` (the old
worker's bare result and query-string error got HTTP 422 on every call).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from config import Config
from jobs import ClaimedJob, SourceUnavailable, clip_error
from logs import StateLog

log = logging.getLogger("comfyui_worker.http")


class HttpJobSource:
    """Pulls jobs from GET /api/workers/next-job and reports through complete-job / fail-job."""

    name = "http"

    def __init__(self, cfg: Config, states: StateLog | None = None) -> None:
        self.cfg = cfg
        self.states = states or StateLog(log)
        self.base = cfg.queue_manager_url
        self._session: aiohttp.ClientSession | None = None
        self._cancel_hint = asyncio.Event()

    def helpers(self) -> list[asyncio.Task[None]]:
        return []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.queue_manager_timeout)
        )

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        assert self._session is not None, "start() first"
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.states.set("queue-manager", "down", str(exc) or type(exc).__name__, 30)
            raise SourceUnavailable(f"queue-manager: {exc or type(exc).__name__}") from exc
        if resp.status >= 500:
            self.states.set("queue-manager", "down", f"HTTP {resp.status}", logging.WARNING)
            raise SourceUnavailable(f"queue-manager answered HTTP {resp.status}")
        self.states.set("queue-manager", "up")
        return resp.status, body

    async def recover(self) -> list[str]:
        """The API cannot list running jobs by worker; the queue-manager's reaper handles them."""
        return []

    async def claim(self) -> ClaimedJob | None:
        status, body = await self._request(
            "GET", "/api/workers/next-job", params={"worker_id": self.cfg.worker_id}
        )
        if status != 200:
            raise SourceUnavailable(f"next-job answered HTTP {status}: {body[:200]!r}")
        try:
            job = json.loads(body).get("job")
        except (ValueError, AttributeError) as exc:
            raise SourceUnavailable(f"next-job answered unreadable JSON: {exc}") from exc
        if job is None:
            return None
        if not isinstance(job, dict) or not isinstance(job.get("id"), str):
            log.error("next-job returned a job without an id; cannot report on it: %.200s", body)
            return None
        return ClaimedJob(id=job["id"], doc=job, raw_size=len(body))

    async def wait_for_work(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, self.cfg.http_poll_interval))

    async def heartbeat(self, status: dict[str, Any]) -> None:
        """No heartbeat endpoint exists; next-job refreshes it while the worker is idle."""

    async def _report(self, path: str, job: ClaimedJob, body: dict[str, Any]) -> str:
        delay = 1.0
        while True:
            try:
                status, text = await self._request(
                    "POST", path, params={"job_id": job.id}, json=body
                )
            except SourceUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.backoff_max)
                continue
            if status in (200, 201, 204):
                return "ok"
            if status == 404:
                return "stale"
            log.error("%s answered HTTP %s: %.300s", path, status, text)
            return "stale"

    async def complete(self, job: ClaimedJob, result: dict[str, Any]) -> str:
        return await self._report("/api/workers/complete-job", job, {"result": result})

    async def fail(self, job: ClaimedJob, error: str, details: dict[str, Any]) -> str:
        text = error
        if details:
            extra = json.dumps(details, default=str)
            text = f"{error}\n{extra}"
        return await self._report("/api/workers/fail-job", job, {"error": clip_error(text)})

    async def requeue(self, job: ClaimedJob, reason: str) -> bool:
        return False

    async def retry(self, job: ClaimedJob, reason: str, delay: float) -> str:
        return "unsupported"

    async def reap_orphans(self, grace: float) -> list[tuple[str, str]]:
        """The API cannot list running jobs by worker; the queue-manager's reaper handles them."""
        return []

    async def is_cancelled(self, job: ClaimedJob) -> bool:
        status, body = await self._request("GET", f"/api/jobs/{job.id}")
        if status == 404:
            return True
        if status != 200:
            return False
        try:
            doc = json.loads(body)
        except ValueError:
            return False
        if isinstance(doc, dict) and isinstance(doc.get("job"), dict):
            doc = doc["job"]
        return isinstance(doc, dict) and doc.get("status") == "cancelled"

    async def mark_cancelled(self, job: ClaimedJob) -> None:
        """The queue-manager already recorded the cancellation; nothing to report."""

    def cancel_hint(self) -> asyncio.Event:
        return self._cancel_hint
