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
