"""Job source reading the platform's Redis directly (CONTRACTS.md §1), the default.

Beyond the contract's keys, one key of its own: the hash `comfyume:not_before` (job id -> unix
time) defers a job put back for lack of VRAM, so every worker claims past it until then; the job
keeps its place (its original score) in queue:pending. Jobs put back after a crash, after their
worker vanished (heartbeat gone) or for VRAM carry `metadata.attempts` and
`metadata.attempted_by`; at WORKER_MAX_ATTEMPTS such a job fails instead of circulating.

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
import re
import time
from typing import Any

import redis.asyncio as aioredis
from config import Config
from jobs import (
    ClaimedJob,
    SourceUnavailable,
    clip_error,
    is_safe_segment,
    iso_to_unix,
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
NOT_BEFORE = "comfyume:not_before"
MAX_ATTEMPTS = 20
ROUND_ROBIN_SCAN = 1000
# How far down queue:pending a claim looks past deferred jobs.
DEFER_SCAN = 200
# Events larger than this are not parsed: every worker receives every event.
EVENT_PARSE_LIMIT = 64 * 1024

# KEYS: job key, from zset, to zset ('' = none), counter key ('' = none),
#       [a key that must not exist ('' = none), [the not-before hash]]
# ARGV: job id, expected sha1 of the job JSON, new JSON ('' = keep), score, event JSON ('' = none),
#       [not-before unix time, the hash's TTL in seconds]
# Returns 1 moved, 0 not in the from-set, -1 job JSON changed meanwhile, -2 job key missing,
# -3 the must-not-exist key exists (a worker's heartbeat came back).
TRANSITION_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return -2 end
if redis.sha1hex(cur) ~= ARGV[2] then return -1 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
if KEYS[5] and KEYS[5] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then return -3 end
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3]) end
if KEYS[4] ~= '' then redis.call('INCR', KEYS[4]) end
if KEYS[6] and KEYS[6] ~= '' then
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[6])
  redis.call('EXPIRE', KEYS[6], ARGV[7])
end
if ARGV[5] ~= '' then redis.call('PUBLISH', 'queue:updates', ARGV[5]) end
return 1
"""

# KEYS: queue:pending, the not-before hash. ARGV: now (unix), how many to look at.
# The first pending job that is not deferred, with its score, JSON length and JSON (nil when the
# JSON is over ARGV[3] bytes), in one round trip; deferrals that have passed are dropped.
PEEK_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local now = tonumber(ARGV[1])
for i = 1, #ids, 2 do
  local nb = redis.call('HGET', KEYS[2], ids[i])
  if not nb or tonumber(nb) <= now then
    if nb then redis.call('HDEL', KEYS[2], ids[i]) end
    local key = 'job:' .. ids[i]
    local size = redis.call('STRLEN', key)
    if size > tonumber(ARGV[3]) then return {ids[i], ids[i + 1], size} end
    return {ids[i], ids[i + 1], size, redis.call('GET', key)}
  end
end
return false
"""

# KEYS: job key, queue:pending, queue:failed. ARGV: id, the JSON's size as read, the failed
# record, score, event. An oversized pending job is failed unread, if it is still that job.
REFUSE_LUA = """
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[2]) then return -1 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('SET', KEYS[1], ARGV[3])
redis.call('PUBLISH', 'queue:updates', ARGV[5])
return 1
"""

# How much of a job's JSON is read to salvage its user, priority and creation time.
SALVAGE_BYTES = 4096

# A pending id whose job key is gone cannot be run: drop it, but only if it is still gone.
DROP_GHOST_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def attempts_of(doc: dict[str, Any]) -> tuple[int, list[str]]:
    """How often the job was put back after a failed attempt, and on which workers."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    count = meta.get("attempts")
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0
    workers = meta.get("attempted_by")
    workers = [w for w in workers if isinstance(w, str)] if isinstance(workers, list) else []
    return count, workers


def _with_attempt(doc: dict[str, Any], worker: Any) -> dict[str, Any]:
    count, workers = attempts_of(doc)
    meta = doc.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta.update(attempts=count + 1, attempted_by=[*workers, str(worker or "unknown")])
    return {**doc, "metadata": meta}


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
        self._refuse = self.redis.register_script(REFUSE_LUA)
        # Workers whose heartbeat key was seen missing, and since when (monotonic, unix).
        self._missing: dict[str, tuple[float, float]] = {}
        self._owners: dict[str, tuple[float, str | None]] = {}
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
        if isinstance(data, (bytes, str)) and len(data) > EVENT_PARSE_LIMIT:
            # Not parsed (a large workflow): a spurious wake costs one claim, nothing more.
            self._wake.set()
            mine = self.current_job_id
            if mine and (mine.encode() if isinstance(data, bytes) else mine) in data:
                self._cancel_hint.set()
            return
        try:
            event = json.loads(data)
            kind = event.get("type")
            job = event.get("data") or {}
        except (ValueError, TypeError, AttributeError, RecursionError):
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

    async def _select(self) -> tuple[str, float, int, bytes | None] | None:
        """Next candidate by QUEUE_MODE: id, score, JSON size and JSON (None when over
        WORKER_MAX_JOB_BYTES, which is then never read whole); the claim re-checks it."""
        if self.cfg.queue_mode != "round_robin":
            head = await self._call(
                self._peek(
                    keys=[PENDING, NOT_BEFORE],
                    args=[time.time(), DEFER_SCAN, self.cfg.max_job_bytes],
                )
            )
            if not head:
                return None
            member, score, size, *raw = head
            return member.decode(), float(score), int(size), raw[0] if raw else None
        picked = await self._select_round_robin()
        if picked is None:
            return None
        key = f"job:{picked[0]}"
        size = await self._call(self.redis.strlen(key))
        raw = await self._call(self.redis.get(key)) if size <= self.cfg.max_job_bytes else None
        return picked[0], picked[1], int(size), raw

    async def _users(self, ids: list[str]) -> list[str | None]:
        """The user of each job id, read once per job (a job's user never changes)."""
        missing = [i for i in ids if i not in self._rr_users]
        if missing:
            # Only the head of each JSON: the user id comes early, and a job may be huge.
            pipe = self.redis.pipeline(transaction=False)
            for job_id in missing:
                pipe.getrange(f"job:{job_id}", 0, SALVAGE_BYTES - 1)
            heads = await self._call(pipe.execute())
            for job_id, head in zip(missing, heads, strict=False):
                self._rr_users[job_id] = _field(head, "user_id") if head else None
        return [self._rr_users[i] for i in ids]

    async def _select_round_robin(self) -> tuple[str, float] | None:
        """The oldest job of the user with the fewest jobs completed or running now.

        Counting running jobs too means two workers choosing at once serve two users, not the
        same one twice (user:{id}:completed changes only when a job ends).
        """
        entries = await self._call(
            self.redis.zrange(PENDING, 0, ROUND_ROBIN_SCAN - 1, withscores=True)
        )
        if not entries:
            return None
        deferred = await self._call(self.redis.hgetall(NOT_BEFORE))
        now = time.time()
        held = {k.decode() for k, v in deferred.items() if _float(v) > now}
        entries = [(m.decode(), float(s)) for m, s in entries]
        entries = [(i, s) for i, s in entries if i not in held]
        if not entries:
            return None
        running = [m.decode() for m in await self._call(self.redis.zrange(RUNNING, 0, -1))]
        ids = [i for i, _ in entries]
        users = await self._users(ids + running)
        keep = set(ids) | set(running)
        for stale in [i for i in self._rr_users if i not in keep]:
            del self._rr_users[stale]
        pending_users = users[: len(ids)]
        names = sorted({u for u in users if u})
        counts: dict[str | None, int] = {None: 0}
        if names:
            values = await self._call(self.redis.mget([f"user:{u}:completed" for u in names]))
            for user, value in zip(names, values, strict=False):
                try:
                    counts[user] = int(value or 0)
                except ValueError:
                    counts[user] = 0
        for user in users[len(ids) :]:
            if user:
                counts[user] = counts.get(user, 0) + 1
        best = min(
            (counts.get(user, 0), score, job_id)
            for (job_id, score), user in zip(entries, pending_users, strict=False)
        )
        return best[2], best[1]

    # -- claiming --------------------------------------------------------------------------

    async def claim(self) -> ClaimedJob | None:
        for _ in range(MAX_ATTEMPTS):
            candidate = await self._select()
            if candidate is None:
                return None
            job_id, score, size, raw = candidate
            key = f"job:{job_id}"
            if raw is None and size == 0:
                if await self._call(self._drop_ghost(keys=[key, PENDING], args=[job_id])):
                    log.warning("dropped pending id %s: its job key does not exist", job_id)
                continue
            if raw is None:
                await self._refuse_oversized(job_id, size)
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
            new_doc = dict(doc) if doc is not None else _salvage(job_id, raw)
            new_doc.update(status="running", worker_id=self.cfg.worker_id, started_at=utc_now_iso())
            new_raw = json.dumps(new_doc)
            moved = await self._call(
                self._transition(
                    keys=[key, PENDING, RUNNING, ""],
                    args=[job_id, _sha1(raw), new_raw, now, _event("job_updated", new_doc)],
                )
            )
            if moved == 1:
                if self.cfg.queue_mode == "round_robin":  # fifo's peek dropped it already
                    await self._call(self.redis.hdel(NOT_BEFORE, job_id))
                if invalid:
                    log.warning("claimed job %s with unreadable JSON: %s", job_id, invalid)
                return ClaimedJob(
                    id=job_id, doc=new_doc, raw_size=len(raw), score=score, invalid=invalid
                )
        return None

    async def _refuse_oversized(self, job_id: str, size: int) -> None:
        """Fail a job whose JSON is over WORKER_MAX_JOB_BYTES without reading it whole: a
        contract-shaped record from its first bytes replaces it (compare-and-set on its head)."""
        key = f"job:{job_id}"
        head = await self._call(self.redis.getrange(key, 0, SALVAGE_BYTES - 1))
        tail = await self._call(self.redis.getrange(key, -SALVAGE_BYTES, -1))
        if not head:
            return
        doc = _salvage(job_id, head + b" " + (tail or b""))
        doc.update(
            status="failed",
            worker_id=self.cfg.worker_id,
            completed_at=utc_now_iso(),
            error=f"job payload is {size} bytes, over the limit of {self.cfg.max_job_bytes} "
            "(WORKER_MAX_JOB_BYTES)",
            result={"error_kind": "invalid_job"},
        )
        moved = await self._call(
            self._refuse(
                keys=[key, PENDING, FAILED],
                args=[job_id, size, json.dumps(doc), time.time(), _event("job_updated", doc)],
            )
        )
        if moved == 1:
            log.warning("failed job %s unread: its JSON is %d bytes", job_id, size)

    # -- reporting -------------------------------------------------------------------------

    async def _finish(
        self,
        job: ClaimedJob,
        target: str,
        changes: dict[str, Any],
        counter: bool = False,
        owner: str | None = None,
        attempt: str | None = None,
        not_before: float | None = None,
        absent: str = "",
    ) -> str:
        """Move a running job of `owner` (default: this worker) to `target`.

        Returns 'ok', 'cancelled' (the platform cancelled it), 'stale' (no longer that owner's),
        or 'failed' when `attempt` (the reason for a counted put-back) reached
        WORKER_MAX_ATTEMPTS and the job was failed instead. `absent` names a key that must not
        exist at the moment of the move (the vanished owner's heartbeat).
        """
        owner = owner or self.cfg.worker_id
        key = f"job:{job.id}"
        for _ in range(MAX_ATTEMPTS):
            raw = await self._call(self.redis.get(key))
            if raw is None:
                return "stale"
            doc, _ = _parse(raw)
            if doc is None:
                doc = _salvage(job.id, raw)
            if doc.get("status") == "cancelled":
                await self._remove_cancelled(job, raw, doc)
                return "cancelled"
            if doc.get("worker_id") != owner or doc.get("status") != "running":
                return "stale"
            new_doc, to, verdict = {**doc, **changes}, target, "ok"
            if attempt is not None:
                new_doc = _with_attempt(new_doc, owner)
                count, workers = attempts_of(new_doc)
                if count >= self.cfg.max_attempts:
                    to, verdict = FAILED, "failed"
                    new_doc.update(
                        status="failed",
                        worker_id=doc.get("worker_id"),
                        started_at=doc.get("started_at"),
                        completed_at=utc_now_iso(),
                        error=clip_error(
                            f"gave up after {count} attempts (WORKER_MAX_ATTEMPTS="
                            f"{self.cfg.max_attempts}); it ran on {', '.join(workers)}; "
                            f"last: {attempt}"
                        ),
                        result={"error_kind": "attempts", "attempted_by": workers},
                    )
            counter_key = ""
            if counter and is_user(new_doc.get("user_id")):
                counter_key = f"user:{new_doc['user_id']}:completed"
            keys = [key, RUNNING, to, counter_key, absent]
            args: list[Any] = [
                job.id,
                _sha1(raw),
                json.dumps(new_doc),
                time.time() if to != PENDING else (job.score or pending_score(doc)),
                _event("job_updated", new_doc),
            ]
            if to == PENDING and not_before is not None:
                keys.append(NOT_BEFORE)
                args += [not_before, max(60, int(self.cfg.vram_backoff_max * 4))]
            moved = await self._call(self._transition(keys=keys, args=args))
            if moved == 1:
                return verdict
            if moved in (0, -3):
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
        """Put back a job that was not at fault (a stop, ComfyUI away): not an attempt."""
        outcome = await self._finish(job, PENDING, PUT_BACK)
        if outcome == "ok":
            log.info("put job %s back in the queue: %s", job.id, reason)
        return outcome == "ok"

    async def retry(self, job: ClaimedJob, reason: str, delay: float) -> str:
        """Put back a job this worker cannot run now (VRAM), counted as an attempt and deferred
        by `delay` seconds so the jobs behind it run meanwhile. Returns 'requeued', 'failed'
        (the attempt limit was reached: the job failed), 'cancelled' or 'stale'."""
        outcome = await self._finish(
            job, PENDING, PUT_BACK, attempt=reason, not_before=time.time() + delay
        )
        if outcome == "ok":
            log.info("put job %s back for %.0f s: %s", job.id, delay, reason)
            return "requeued"
        return outcome

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
            why = f"worker {self.cfg.worker_id} stopped (crashed or was killed) while running it"
            outcome = await self._finish(job, PENDING, PUT_BACK, attempt=why)
            if outcome == "ok":
                log.info("put job %s back in the queue: left running by a previous run", job_id)
                recovered.append(job_id)
            elif outcome == "failed":
                log.warning("failed job %s: %s, and it reached WORKER_MAX_ATTEMPTS", job_id, why)
        return recovered

    async def reap_orphans(self, grace: float) -> list[tuple[str, str]]:
        """Put back (or fail, at the attempt limit) running jobs of workers whose heartbeat key
        has been gone for `grace` seconds; returns (job id, outcome) pairs.

        Any live worker may do this; the move is a compare-and-set that also checks the
        heartbeat is still gone, so a job is taken over once, and never from a live worker.
        """
        running = await self._call(self.redis.zrange(RUNNING, 0, -1, withscores=True))
        owners: dict[str, tuple[float, str | None]] = {}
        for member, score in running:
            job_id = member.decode()
            known = self._owners.get(job_id)
            if known is None or known[0] != score:  # claimed again since: read its owner again
                # The whole JSON, once per claim: worker_id comes after the workflow.
                raw = await self._call(self.redis.get(f"job:{job_id}"))
                doc, _ = _parse(raw) if raw is not None else (None, None)
                owner = (doc or {}).get("worker_id")
                known = (score, owner if isinstance(owner, str) else None)
            owners[job_id] = known
        self._owners = owners
        others = sorted({w for _, w in owners.values() if w and w != self.cfg.worker_id})
        now, wall = time.monotonic(), time.time()
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for worker in others:
                pipe.exists(f"worker:{worker}:heartbeat")
            alive = await self._call(pipe.execute())
            for worker, up in zip(others, alive, strict=False):
                if up:
                    self._missing.pop(worker, None)
                else:
                    self._missing.setdefault(worker, (now, wall))
        self._missing = {w: t for w, t in self._missing.items() if w in others}
        taken = []
        for job_id, (claimed, worker) in owners.items():
            seen = self._missing.get(worker or "")
            if worker is None or seen is None or now - seen[0] < grace:
                continue
            if claimed >= seen[1]:
                # Claimed after its worker was seen gone: a worker restarted under the same id
                # that has not beaten yet. Not an orphan.
                continue
            since = seen[0]
            why = (
                f"worker {worker} vanished while running it (its heartbeat key has been gone for "
                f"{now - since + self.cfg.heartbeat_ttl:.0f} s or more)"
            )
            job = ClaimedJob(id=job_id, doc=None, raw_size=0)
            outcome = await self._finish(
                job,
                PENDING,
                PUT_BACK,
                owner=worker,
                attempt=why,
                absent=f"worker:{worker}:heartbeat",
            )
            if outcome in ("ok", "failed"):
                verb = "put back" if outcome == "ok" else "failed at WORKER_MAX_ATTEMPTS"
                log.warning("job %s %s: %s", job_id, verb, why)
                taken.append((job_id, outcome))
        return taken

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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, f"job JSON is malformed: {type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(doc, dict):
        return None, f"job JSON is a {type(doc).__name__}, not an object"
    return doc, None


PUT_BACK = {"status": "pending", "worker_id": None, "started_at": None}


def _field(raw: bytes | None, name: str) -> str | None:
    """A top-level string field found in (part of) a job's JSON, without parsing it whole."""
    if not raw:
        return None
    match = re.search(rb'"%s"\s*:\s*"([^"\\]{1,200})"' % name.encode(), raw)
    return match.group(1).decode(errors="replace") if match else None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _salvage(job_id: str, raw: bytes = b"") -> dict[str, Any]:
    """A contract-shaped record for a job whose JSON cannot be used (malformed, or too large to
    read), with what can be recovered from its bytes, so the queue-manager can still show it:
    its user (when it has the contract's form), priority and creation time."""
    user = _field(raw, "user_id")
    priority = re.search(rb'"priority"\s*:\s*([0-3])\b', raw or b"")
    created = _field(raw, "created_at")
    return new_job_record(
        job_id,
        user if is_safe_segment(user) else "unknown",
        {},
        int(priority.group(1)) if priority else 2,
        created if iso_to_unix(created) is not None else utc_now_iso(),
    )
