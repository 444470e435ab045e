"""The Redis job source against a real redis-server: atomic claims and contract-shaped keys."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from config import Config
from jobs import iso_to_unix
from queue_redis import RedisJobSource
from worker_testlib import image_workflow, job, submit

pytestmark = pytest.mark.integration


def _source(redis_server, worker_id: str = "w1", **env: str) -> RedisJobSource:
    cfg = Config.from_env({**redis_server.env(), "WORKER_ID": worker_id, **env})
    return RedisJobSource(cfg)


async def _with_sources(redis_server, ids, body, **env):
    sources = [_source(redis_server, i, **env) for i in ids]
    try:
        return await body(*sources)
    finally:
        for s in sources:
            await s.close()


def test_concurrent_claims_never_duplicate(r, redis_server) -> None:
    ids = {submit(r, image_workflow(), publish=False) for _ in range(150)}

    async def claimer(source):
        got = []
        while (claimed := await source.claim()) is not None:
            got.append(claimed.id)
        return got

    async def body(*sources):
        return await asyncio.gather(*(claimer(s) for s in sources))

    results = asyncio.run(_with_sources(redis_server, [f"w{i}" for i in range(6)], body))
    claimed = [i for got in results for i in got]
    assert len(claimed) == len(set(claimed)) == len(ids)
    assert set(claimed) == ids
    assert r.zcard("queue:pending") == 0 and r.zcard("queue:running") == len(ids)
    for source_index, got in enumerate(results):
        for job_id in got:
            assert job(r, job_id)["worker_id"] == f"w{source_index}"


def test_claim_keeps_the_job_exact_and_contract_shaped(r, redis_server) -> None:
    wf = image_workflow()
    wf["9"] = {"class_type": "KSampler", "inputs": {"seed": 18446744073709551615, "list": []}}
    job_id = submit(r, wf, metadata={"estimated_vram": 1234, "nested": {}})

    async def body(source):
        return await source.claim()

    before = time.time()
    claimed = asyncio.run(_with_sources(redis_server, ["w1"], body))
    doc = job(r, job_id)
    assert claimed.id == job_id and claimed.score is not None
    assert doc["workflow"] == wf  # 64-bit seed and empty list survive
    assert doc["metadata"] == {"estimated_vram": 1234, "nested": {}}
    assert doc["status"] == "running" and doc["worker_id"] == "w1"
    assert iso_to_unix(doc["started_at"]) >= before - 1
    assert r.zscore("queue:running", job_id) >= before - 1


def test_ghost_and_cancelled_pending_entries_are_skipped(r, redis_server) -> None:
    r.zadd("queue:pending", {"ghost": 1})
    cancelled = submit(r, image_workflow(), publish=False)
    r.set(f"job:{cancelled}", json.dumps({**job(r, cancelled), "status": "cancelled"}))
    good = submit(r, image_workflow(), priority=3, publish=False)

    async def body(source):
        return await source.claim()

    claimed = asyncio.run(_with_sources(redis_server, ["w1"], body))
    assert claimed.id == good
    assert r.zcard("queue:pending") == 0
    assert job(r, cancelled)["status"] == "cancelled"


def test_requeue_restores_the_original_score(r, redis_server) -> None:
    job_id = submit(r, image_workflow(), priority=1, publish=False)
    score = r.zscore("queue:pending", job_id)

    async def body(source):
        claimed = await source.claim()
        assert await source.requeue(claimed, "test")

    asyncio.run(_with_sources(redis_server, ["w1"], body))
    doc = job(r, job_id)
    assert r.zscore("queue:pending", job_id) == score
    assert doc["status"] == "pending" and doc["worker_id"] is None and doc["started_at"] is None


def test_complete_fail_and_cancel_outcomes(r, redis_server) -> None:
    done, failed, cancelled, reaped = (submit(r, publish=False) for _ in range(4))

    async def body(source):
        jobs = {j.id: j for j in [await source.claim() for _ in range(4)]}
        assert await source.complete(jobs[done], {"outputs": []}) == "ok"
        assert await source.fail(jobs[failed], "boom", {"error_kind": "x"}) == "ok"
        r.set(f"job:{cancelled}", json.dumps({**job(r, cancelled), "status": "cancelled"}))
        assert await source.is_cancelled(jobs[cancelled])
        assert await source.complete(jobs[cancelled], {}) == "cancelled"
        # The queue-manager's reaper moved this one to failed meanwhile: not ours any more.
        r.zrem("queue:running", reaped)
        r.zadd("queue:failed", {reaped: time.time()})
        r.set(f"job:{reaped}", json.dumps({**job(r, reaped), "status": "failed"}))
        assert await source.complete(jobs[reaped], {}) == "stale"

    asyncio.run(_with_sources(redis_server, ["w1"], body))
    assert job(r, done)["status"] == "completed" and job(r, done)["result"] == {"outputs": []}
    assert r.get("user:alice:completed") == b"1"
    assert job(r, failed)["error"] == "boom" and r.zscore("queue:failed", failed)
    assert job(r, cancelled)["status"] == "cancelled"
    assert r.zscore("queue:running", cancelled) is None
    assert job(r, reaped)["status"] == "failed"
    assert r.zcard("queue:running") == 0


def test_recover_takes_back_only_this_workers_jobs(r, redis_server) -> None:
    mine, theirs = submit(r, publish=False, priority=0), submit(r, publish=False, priority=1)
    score = r.zscore("queue:pending", mine)

    async def claim_both(a, b):
        await a.claim()
        await b.claim()

    asyncio.run(_with_sources(redis_server, ["w1", "w2"], claim_both))

    async def recover(a):
        return await a.recover()

    assert asyncio.run(_with_sources(redis_server, ["w1"], recover)) == [mine]
    assert r.zscore("queue:pending", mine) == score
    assert job(r, theirs)["status"] == "running"


def test_events_are_json_in_the_queue_managers_shape(r, redis_server) -> None:
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("queue:updates")
    job_id = submit(r, publish=False)

    async def body(source):
        claimed = await source.claim()
        await source.complete(claimed, {"ok": True})

    asyncio.run(_with_sources(redis_server, ["w1"], body))
    events = []
    deadline = time.time() + 5
    while len(events) < 2 and time.time() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg:
            events.append(json.loads(msg["data"]))
    pubsub.close()
    assert [e["type"] for e in events] == ["job_updated", "job_updated"]
    assert [e["data"]["status"] for e in events] == ["running", "completed"]
    assert all(e["data"]["id"] == job_id and iso_to_unix(e["timestamp"]) for e in events)


def test_round_robin_picks_the_least_served_user(r, redis_server) -> None:
    r.set("user:alice:completed", 3)
    r.set("user:bob:completed", 1)
    a1 = submit(r, user_id="alice", publish=False)
    b1 = submit(r, user_id="bob", publish=False)
    c1 = submit(r, user_id="carol", priority=3, publish=False)
    b2 = submit(r, user_id="bob", publish=False)

    async def body(source):
        return [(await source.claim()).id for _ in range(4)]

    order = asyncio.run(_with_sources(redis_server, ["w1"], body, QUEUE_MODE="round_robin"))
    assert order[:3] == [c1, b1, b2] and order[3] == a1


def test_heartbeat_and_status_keys(r, redis_server) -> None:
    async def body(source):
        await source.heartbeat({"state": "idle"})

    asyncio.run(_with_sources(redis_server, ["w1"], body))
    assert 0 < r.ttl("worker:w1:heartbeat") <= 60
    assert iso_to_unix(r.get("worker:w1:heartbeat").decode())
    assert json.loads(r.get("worker:w1:status")) == {"state": "idle"}


# -- attempts, orphans, deferrals, fairness, untrusted sizes ------------------------------------


def test_orphaned_job_is_taken_over_once_with_its_score_and_an_attempt(r, redis_server) -> None:
    orphan = submit(r, image_workflow(), priority=1, publish=False)
    alive = submit(r, image_workflow(), priority=1, publish=False)
    score = r.zscore("queue:pending", orphan)

    async def body(gone, live, a, b):
        await gone.claim()  # w-gone never beats: its host vanished
        await live.claim()
        await live.heartbeat({"state": "running"})
        # Two live workers look at once, twice (the first look only notes the missing key).
        first = await asyncio.gather(a.reap_orphans(0), b.reap_orphans(0))
        second = await asyncio.gather(a.reap_orphans(0), b.reap_orphans(0))
        return first, second

    first, second = asyncio.run(_with_sources(redis_server, ["w-gone", "w-live", "wa", "wb"], body))
    taken = [t for found in [*first, *second] for t in found]
    assert taken == [(orphan, "ok")]  # once, by one of them
    doc = job(r, orphan)
    assert doc["status"] == "pending" and doc["worker_id"] is None
    assert r.zscore("queue:pending", orphan) == score
    assert doc["metadata"]["attempts"] == 1 and doc["metadata"]["attempted_by"] == ["w-gone"]
    assert job(r, alive)["status"] == "running"  # its worker's heartbeat is there


def test_orphan_grace_counts_from_when_the_heartbeat_was_seen_missing(r, redis_server) -> None:
    orphan = submit(r, image_workflow(), publish=False)

    async def body(gone, live):
        await gone.claim()
        assert await live.reap_orphans(0.5) == []  # just noticed
        assert await live.reap_orphans(0.5) == []  # not yet 0.5 s
        await asyncio.sleep(0.6)
        return await live.reap_orphans(0.5)

    assert asyncio.run(_with_sources(redis_server, ["w-gone", "w-live"], body)) == [(orphan, "ok")]


def test_attempt_limit_fails_the_job_naming_the_workers(r, redis_server) -> None:
    job_id = submit(
        r, image_workflow(), publish=False, metadata={"attempts": 2, "attempted_by": ["a", "b"]}
    )

    async def body(w1):
        await w1.claim()
        return await w1.recover()  # w1 "crashed" while running it: a third attempt

    assert asyncio.run(_with_sources(redis_server, ["w1"], body, WORKER_MAX_ATTEMPTS="3")) == []
    doc = job(r, job_id)
    assert doc["status"] == "failed" and r.zscore("queue:failed", job_id) is not None
    assert "3 attempts (WORKER_MAX_ATTEMPTS=3)" in doc["error"]
    assert "ran on a, b, w1" in doc["error"]
    assert doc["result"] == {"error_kind": "attempts", "attempted_by": ["a", "b", "w1"]}
    assert r.zscore("queue:pending", job_id) is None and r.zscore("queue:running", job_id) is None


@pytest.mark.parametrize("mode", ["fifo", "round_robin"])
def test_a_deferred_job_keeps_its_place_and_the_ones_behind_it_run(r, redis_server, mode) -> None:
    big = submit(r, image_workflow(), user_id="u1", publish=False)
    small = submit(r, image_workflow(), user_id="u2", publish=False)
    score = r.zscore("queue:pending", big)

    async def body(w1):
        first = await w1.claim()
        assert first.id == big
        assert await w1.retry(first, "VRAM short", 30) == "requeued"
        second = await w1.claim()
        again = await w1.claim()  # only the deferred one is left
        r.hset("comfyume:not_before", big, time.time() - 1)  # its time has come
        third = await w1.claim()
        return second.id, again, third.id

    second, again, third = asyncio.run(_with_sources(redis_server, ["w1"], body, QUEUE_MODE=mode))
    assert (second, again, third) == (small, None, big)
    assert job(r, big)["metadata"]["attempts"] == 1
    assert r.hget("comfyume:not_before", big) is None  # claimed: its deferral is gone
    assert r.ttl("comfyume:not_before") > 0 or not r.exists("comfyume:not_before")
    assert score == pytest.approx(2_000_000 + iso_to_unix(job(r, big)["created_at"]))


def test_round_robin_counts_running_jobs_so_two_workers_serve_two_users(r, redis_server) -> None:
    a1 = submit(r, user_id="alice", publish=False)
    a2 = submit(r, user_id="alice", publish=False)
    b1 = submit(r, user_id="bob", publish=False)

    async def body(w1, w2):
        return (await w1.claim()).id, (await w2.claim()).id

    first, second = asyncio.run(
        _with_sources(redis_server, ["w1", "w2"], body, QUEUE_MODE="round_robin")
    )
    # Neither has completed anything; alice's first job is running, so bob is next, not a2.
    assert (first, second) == (a1, b1)
    assert job(r, a2)["status"] == "pending"


def test_an_oversized_job_fails_unread_and_keeps_a_readable_record(r, redis_server) -> None:
    huge = {"1": {"class_type": "Note", "inputs": {"text": "x" * 50_000}}}
    job_id = submit(r, huge, user_id="alice", priority=1, publish=False)
    created = job(r, job_id)["created_at"]
    nxt = submit(r, image_workflow(), user_id="bob", priority=1, publish=False)

    async def body(w1):
        return (await w1.claim()).id

    claimed = asyncio.run(_with_sources(redis_server, ["w1"], body, WORKER_MAX_JOB_BYTES="8192"))
    assert claimed == nxt
    doc = job(r, job_id)
    assert doc["status"] == "failed" and r.zscore("queue:failed", job_id) is not None
    assert "WORKER_MAX_JOB_BYTES" in doc["error"] and "8192" in doc["error"]
    # What the queue-manager needs to show it: the user, priority, creation time, an object.
    assert doc["user_id"] == "alice" and doc["priority"] == 1 and doc["created_at"] == created
    assert doc["workflow"] == {} and doc["result"] == {"error_kind": "invalid_job"}


def test_a_malformed_job_is_recorded_in_the_contracts_shape(r, redis_server) -> None:
    job_id = "0f0e0d0c-0000-4000-8000-000000000001"
    r.set(f"job:{job_id}", '{"id": "x", "user_id": "carol", "workflow": {"1": ')
    r.zadd("queue:pending", {job_id: 2_000_000 + time.time()})

    async def body(w1):
        return await w1.claim()

    claimed = asyncio.run(_with_sources(redis_server, ["w1"], body))
    assert claimed.id == job_id and claimed.invalid
    doc = job(r, job_id)
    assert doc["user_id"] == "carol" and doc["workflow"] == {}
    assert iso_to_unix(doc["created_at"]) is not None and doc["priority"] == 2


def test_large_events_are_not_parsed(redis_server, monkeypatch) -> None:
    import queue_redis

    source = _source(redis_server)
    source.current_job_id = "job-7"
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(queue_redis.json, "loads", lambda d: parsed.append(1) or real_loads(d))
    event = json.dumps(
        {"type": "job_updated", "data": {"id": "job-7", "workflow": {"t": "x" * 100_000}}}
    )
    source._on_event(event.encode())
    assert parsed == []
    assert source._wake.is_set() and source.cancel_hint().is_set()
    asyncio.run(source.close())


def test_an_orphan_with_a_large_workflow_is_found(r, redis_server) -> None:
    """worker_id comes after the workflow in the contract's JSON: the owner is read from the
    whole document, not from its first bytes."""
    big = {str(i): {"class_type": "Note", "inputs": {"text": "x" * 200}} for i in range(60)}
    orphan = submit(r, big, publish=False)

    async def body(gone, live):
        await gone.claim()
        return await live.reap_orphans(0) + await live.reap_orphans(0)

    assert asyncio.run(_with_sources(redis_server, ["w-gone", "w-live"], body)) == [(orphan, "ok")]


def test_a_worker_restarted_under_the_same_id_keeps_its_new_job(r, redis_server) -> None:
    """Seen missing, then back under the same id with a claim before its first heartbeat:
    that job was claimed after the absence began, so it is not an orphan."""
    first = submit(r, image_workflow(), publish=False)

    async def body(old, live):
        await old.claim()
        await live.reap_orphans(0)  # notes w-same missing
        r.delete(f"job:{first}")
        r.zrem("queue:running", first)
        await asyncio.sleep(0.01)
        fresh = submit(r, image_workflow(), publish=False)
        await old.claim()  # the restarted worker, before any heartbeat
        return fresh, await live.reap_orphans(0)

    fresh, taken = asyncio.run(_with_sources(redis_server, ["w-same", "w-live"], body))
    assert taken == []
    assert job(r, fresh)["status"] == "running"


def test_a_deeply_nested_job_fails_instead_of_crashing_the_worker(r, redis_server) -> None:
    job_id = "0f0e0d0c-0000-4000-8000-000000000002"
    r.set(f"job:{job_id}", "[" * 100_000 + "]" * 100_000)
    r.zadd("queue:pending", {job_id: 2_000_000 + time.time()})

    async def body(w1):
        return await w1.claim()

    claimed = asyncio.run(_with_sources(redis_server, ["w1"], body))
    assert claimed.id == job_id and "malformed" in claimed.invalid
