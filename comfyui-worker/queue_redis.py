"""Job source reading the platform's Redis directly (CONTRACTS.md §1), the default.

Every state change of a job (claim, complete, fail, requeue, cancel) is one Lua script that
moves the id between the sorted sets, rewrites `job:{id}` and publishes the event together,
so no crash or competing worker can leave a job half-moved. The script compares the job's
SHA-1 with the copy the worker read: Redis's Lua JSON library would turn 64-bit seeds in a
workflow into doubles, so the JSON is rewritten here in Python and only swapped in when
nothing changed since it was read (compare-and-set; a loser simply picks again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from config import Config
from jobs import (
    ClaimedJob,
    SourceUnavailable,
    clip_error,
    new_job_record,
    pending_score,
    utc_now_iso,
)
from logs import StateLog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from tasks import keep_running

log = logging.getLogger("comfyui_worker.redis")

PENDING = "queue:pending"
RUNNING = "queue:running"
COMPLETED = "queue:completed"
FAILED = "queue:failed"
UPDATES = "queue:updates"
MAX_ATTEMPTS = 20
ROUND_ROBIN_SCAN = 1000

# KEYS: job key, from zset, to zset ('' = none), counter key ('' = none)
# ARGV: job id, expected sha1 of the job JSON, new JSON ('' = keep), score, event JSON ('' = none)
# Returns 1 moved, 0 not in the from-set, -1 job JSON changed meanwhile, -2 job key missing.
TRANSITION_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return -2 end
if redis.sha1hex(cur) ~= ARGV[2] then return -1 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3]) end
if KEYS[4] ~= '' then redis.call('INCR', KEYS[4]) end
if ARGV[5] ~= '' then redis.call('PUBLISH', 'queue:updates', ARGV[5]) end
return 1
"""

# The head of queue:pending with its score and job JSON, in one round trip.
PEEK_LUA = """
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #head == 0 then return false end
return {head[1], head[2], redis.call('GET', 'job:' .. head[1])}
"""

# A pending id whose job key is gone cannot be run: drop it, but only if it is still gone.
DROP_GHOST_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _event(kind: str, doc: dict[str, Any]) -> str:
    """Events in the queue-manager's shape; everything is already JSON-safe."""
    return json.dumps({"type": kind, "data": doc, "timestamp": utc_now_iso()})


class RedisJobSource:
    """Claims and reports jobs in Redis, waking on `job_created` events with a slow poll behind."""

    name = "redis"

    def __init__(self, cfg: Config, states: StateLog | None = None) -> None:
        self.cfg = cfg
        self.states = states or StateLog(log)
        self.redis = aioredis.Redis(
            host=cfg.redis_host,
            port=cfg.redis_port,
            password=cfg.redis_password or None,
            db=cfg.redis_db,
            socket_connect_timeout=5,
            socket_timeout=15,
            health_check_interval=30,
            # One quick retry for a blip; longer outages are the worker's capped backoff.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        self._transition = self.redis.register_script(TRANSITION_LUA)
        self._drop_ghost = self.redis.register_script(DROP_GHOST_LUA)
        self._peek = self.redis.register_script(PEEK_LUA)
        self._wake = asyncio.Event()
        self._cancel_hint = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._rr_users: dict[str, str | None] = {}
        self.current_job_id: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = asyncio.create_task(
            keep_running("redis listener", self._listen, backoff_max=self.cfg.backoff_max),
            name="redis-listener",
        )

    def helpers(self) -> list[asyncio.Task[None]]:
        """This source's long-running tasks, watched by the worker like its own."""
        return [self._listener] if self._listener else []

    async def close(self) -> None:
        """Stop the listener between reads (never mid-command), then close the pool."""
        self._closing = True
        if self._listener:
            await asyncio.wait({self._listener}, timeout=3)
            if not self._listener.done():
                self._listener.cancel()
                await asyncio.wait({self._listener}, timeout=2)
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), 5)

    async def _listen(self) -> None:
        """Subscribe to queue:updates; reconnects with capped backoff, logging state changes."""
        delay = 0.5
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(UPDATES)
                self.states.set("redis events", "up")
                delay = 0.5
                # A job may have arrived while we were not listening.
                self._wake.set()
                # Short reads, so close() can stop the loop between them instead of
                # cancelling a read in flight.
                while not self._closing:
                    msg = await pubsub.get_message(timeout=0.2)
                    if msg is not None:
                        self._on_event(msg.get("data"))
                await self._close_pubsub(pubsub)
            except (RedisError, OSError) as exc:
                self.states.set("redis events", "down", str(exc) or type(exc).__name__, 30)
                await self._close_pubsub(pubsub)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.backoff_max)

    @staticmethod
    async def _close_pubsub(pubsub: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail any way
            await asyncio.wait_for(pubsub.aclose(), 5)

    def _on_event(self, data: Any) -> None:
        try:
            event = json.loads(data)
            kind = event.get("type")
            job = event.get("data") or {}
        except (ValueError, TypeError, AttributeError):
            return
        if not isinstance(job, dict):
            job = {}
        if kind == "job_created" or (kind == "job_updated" and job.get("status") == "pending"):
            self._wake.set()
        if self.current_job_id and job.get("id") == self.current_job_id:
            self._cancel_hint.set()

    async def wait_for_work(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    def cancel_hint(self) -> asyncio.Event:
        return self._cancel_hint

    # -- reading ---------------------------------------------------------------------------

    async def _call(self, coro: Any) -> Any:
        """Run one Redis call, shielded: a caller being cancelled (a watcher at the end of a
        job, a loop at shutdown) must not cancel redis-py mid-command, which can leave a pooled
        connection with an unread reply."""
        try:
            result = await _shielded(coro)
        except (RedisError, OSError) as exc:
            self.states.set("redis", "down", str(exc) or type(exc).__name__, logging.WARNING)
            raise SourceUnavailable(f"redis: {exc}") from exc
        self.states.set("redis", "up")
        return result

    async def _select(self) -> tuple[str, float, bytes | None] | None:
        """Next candidate by QUEUE_MODE, with its JSON; the claim re-checks it atomically."""
        if self.cfg.queue_mode != "round_robin":
            head = await self._call(self._peek(keys=[PENDING]))
            if not head:
                return None
            member, score, raw = head
            return member.decode(), float(score), raw
        picked = await self._select_round_robin()
        if picked is None:
            return None
        raw = await self._call(self.redis.get(f"job:{picked[0]}"))
        return picked[0], picked[1], raw

    async def _select_round_robin(self) -> tuple[str, float] | None:
        """The oldest job of the user with the fewest completions (user:{id}:completed)."""
        entries = await self._call(
            self.redis.zrange(PENDING, 0, ROUND_ROBIN_SCAN - 1, withscores=True)
        )
        if not entries:
            return None
        ids = [m.decode() for m, _ in entries]
        missing = [i for i in ids if i not in self._rr_users]
        if missing:
            raws = await self._call(self.redis.mget([f"job:{i}" for i in missing]))
            for job_id, raw in zip(missing, raws, strict=False):
                self._rr_users[job_id] = _user_of(raw)
        keep = set(ids)
        for stale in [i for i in self._rr_users if i not in keep]:
            del self._rr_users[stale]
        users = sorted({u for u in (self._rr_users[i] for i in ids) if u})
        counts: dict[str | None, int] = {None: 0}
        if users:
            values = await self._call(self.redis.mget([f"user:{u}:completed" for u in users]))
            for user, value in zip(users, values, strict=False):
                try:
                    counts[user] = int(value or 0)
                except ValueError:
                    counts[user] = 0
        best = min(
            (
                (counts.get(self._rr_users[i], 0), float(s), i)
                for i, (_, s) in zip(ids, entries, strict=False)
            ),
        )
        return best[2], best[1]

    # -- claiming --------------------------------------------------------------------------

    async def claim(self) -> ClaimedJob | None:
        for _ in range(MAX_ATTEMPTS):
            candidate = await self._select()
            if candidate is None:
                return None
            job_id, score, raw = candidate
            key = f"job:{job_id}"
            if raw is None:
                if await self._call(self._drop_ghost(keys=[key, PENDING], args=[job_id])):
                    log.warning("dropped pending id %s: its job key does not exist", job_id)
                continue
            doc, invalid = _parse(raw)
            if doc is not None and doc.get("status") == "cancelled":
                # Cancelled while pending but still listed: take it off the queue, run nothing.
                await self._call(
                    self._transition(
                        keys=[key, PENDING, "", ""], args=[job_id, _sha1(raw), "", 0, ""]
                    )
                )
                continue
            now = time.time()
            new_doc = dict(doc) if doc is not None else _salvage(job_id)
            new_doc.update(status="running", worker_id=self.cfg.worker_id, started_at=utc_now_iso())
            new_raw = json.dumps(new_doc)
            moved = await self._call(
                self._transition(
                    keys=[key, PENDING, RUNNING, ""],
                    args=[job_id, _sha1(raw), new_raw, now, _event("job_updated", new_doc)],
                )
            )
            if moved == 1:
                if invalid:
                    log.warning("claimed job %s with unreadable JSON: %s", job_id, invalid)
                return ClaimedJob(
                    id=job_id, doc=new_doc, raw_size=len(raw), score=score, invalid=invalid
                )
        return None

    # -- reporting -------------------------------------------------------------------------

    async def _finish(
        self,
        job: ClaimedJob,
        target: str,
        changes: dict[str, Any],
        counter: bool = False,
    ) -> str:
        """Move a running job of ours to `target`; 'cancelled' if the platform cancelled it."""
        key = f"job:{job.id}"
        for _ in range(MAX_ATTEMPTS):
            raw = await self._call(self.redis.get(key))
            if raw is None:
                return "stale"
            doc, _ = _parse(raw)
            if doc is None:
                doc = _salvage(job.id)
            if doc.get("status") == "cancelled":
                await self._remove_cancelled(job, raw, doc)
                return "cancelled"
            if doc.get("worker_id") != self.cfg.worker_id or doc.get("status") != "running":
                return "stale"
            new_doc = {**doc, **changes}
            counter_key = ""
            if counter and is_user(new_doc.get("user_id")):
                counter_key = f"user:{new_doc['user_id']}:completed"
            moved = await self._call(
                self._transition(
                    keys=[key, RUNNING, target, counter_key],
                    args=[
                        job.id,
                        _sha1(raw),
                        json.dumps(new_doc),
                        time.time() if target != PENDING else (job.score or pending_score(doc)),
                        _event("job_updated", new_doc),
                    ],
                )
            )
            if moved == 1:
                return "ok"
            if moved == 0:
                return "stale"
        return "stale"

    async def complete(self, job: ClaimedJob, result: dict[str, Any]) -> str:
        changes = {"status": "completed", "completed_at": utc_now_iso(), "result": result}
        changes["error"] = None
        return await self._finish(job, COMPLETED, changes, counter=True)

    async def fail(self, job: ClaimedJob, error: str, details: dict[str, Any]) -> str:
        changes = {
            "status": "failed",
            "completed_at": utc_now_iso(),
            "error": clip_error(error),
            "result": details or None,
        }
        return await self._finish(job, FAILED, changes)

    async def requeue(self, job: ClaimedJob, reason: str) -> bool:
        changes = {"status": "pending", "worker_id": None, "started_at": None}
        outcome = await self._finish(job, PENDING, changes)
        if outcome == "ok":
            log.info("put job %s back in the queue: %s", job.id, reason)
        return outcome == "ok"

    async def is_cancelled(self, job: ClaimedJob) -> bool:
        raw = await self._call(self.redis.get(f"job:{job.id}"))
        if raw is None:
            return True
        doc, _ = _parse(raw)
        return doc is not None and doc.get("status") == "cancelled"

    async def mark_cancelled(self, job: ClaimedJob) -> None:
        raw = await self._call(self.redis.get(f"job:{job.id}"))
        if raw is None:
            await self._call(self.redis.zrem(RUNNING, job.id))
            return
        doc, _ = _parse(raw)
        await self._remove_cancelled(job, raw, doc or _salvage(job.id))

    async def _remove_cancelled(self, job: ClaimedJob, raw: bytes, doc: dict[str, Any]) -> None:
        await self._call(
            self._transition(
                keys=[f"job:{job.id}", RUNNING, "", ""],
                args=[job.id, _sha1(raw), "", 0, _event("job_updated", doc)],
            )
        )

    async def recover(self) -> list[str]:
        """Jobs in queue:running under our worker id were orphaned by a crash: back to pending."""
        recovered = []
        for member in await self._call(self.redis.zrange(RUNNING, 0, -1)):
            job_id = member.decode()
            raw = await self._call(self.redis.get(f"job:{job_id}"))
            doc, _ = _parse(raw) if raw is not None else (None, None)
            if not doc or doc.get("worker_id") != self.cfg.worker_id:
                continue
            job = ClaimedJob(id=job_id, doc=doc, raw_size=len(raw), score=pending_score(doc))
            if doc.get("status") == "cancelled":
                await self._remove_cancelled(job, raw, doc)
                continue
            if await self.requeue(job, "left running by a previous run of this worker"):
                recovered.append(job_id)
        return recovered

    async def heartbeat(self, status: dict[str, Any]) -> None:
        ttl = self.cfg.heartbeat_ttl
        wid = self.cfg.worker_id
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"worker:{wid}:heartbeat", utc_now_iso(), ex=ttl)
        pipe.set(f"worker:{wid}:status", json.dumps(status), ex=ttl)
        await self._call(pipe.execute())


async def _shielded(coro: Any) -> Any:
    task = asyncio.ensure_future(coro)
    # If the caller goes away, the command still finishes; its outcome is consumed here.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


def is_user(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The job's JSON as a dict, or None plus a reason the job must fail."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"job JSON is malformed: {exc}"
    if not isinstance(doc, dict):
        return None, f"job JSON is a {type(doc).__name__}, not an object"
    return doc, None


def _salvage(job_id: str) -> dict[str, Any]:
    """A contract-shaped record for a job whose stored JSON could not be read."""
    return new_job_record(job_id, "", None)


def _user_of(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    doc, _ = _parse(raw)
    user = (doc or {}).get("user_id")
    return user if isinstance(user, str) else None
