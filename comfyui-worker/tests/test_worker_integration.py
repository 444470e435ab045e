"""The worker process end to end: real redis-server, ComfyUI stand-in (and real ComfyUI if present).

Each test starts `python worker.py` as the container does, queues jobs exactly as the
queue-manager does, and checks what the platform would see in Redis and on disk.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from worker_testlib import (
    COMFYUI_KINDS,
    FAKES,
    comfy_server,
    free_port,
    image_workflow,
    job,
    managed_comfyui,
    node_workflow,
    prompts_per_job,
    start_redis,
    submit,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.integration
both = pytest.mark.parametrize("comfyui_kind", COMFYUI_KINDS)


@pytest.fixture
def events(r):
    collected: list[dict] = []
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(**{"queue:updates": lambda m: collected.append(json.loads(m["data"]))})
    thread = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
    yield collected
    thread.stop()
    thread.join(2)
    pubsub.close()


def statuses_of(events: list[dict], job_id: str) -> list[str]:
    return [e["data"]["status"] for e in events if e["data"].get("id") == job_id]


@both
def test_job_completes_with_outputs_in_user_folder(r, comfyui, worker_env, start_worker, events):
    worker = start_worker(worker_env)
    job_id = submit(r, image_workflow())
    doc = wait_job(r, job_id)
    assert doc["status"] == "completed", doc
    assert doc["worker_id"] == worker_env["WORKER_ID"]
    assert doc["started_at"] and doc["completed_at"] and doc["error"] is None
    result = doc["result"]
    [output] = result["outputs"]
    # Paths relative to the outputs root: the result names no folder of the host.
    assert output["path"] == f"alice/{job_id}/{output['filename']}"
    assert (comfyui.outputs_root / output["path"]).read_bytes().startswith(b"\x89PNG")
    assert result["output_dir"] == f"alice/{job_id}"
    assert result["comfyui_version"] and result["execution_ms"] is not None
    # Every key in the contract's shape.
    assert r.zscore("queue:completed", job_id) is not None
    assert r.zscore("queue:running", job_id) is None
    assert r.zscore("queue:pending", job_id) is None
    assert r.get("user:alice:completed") == b"1"
    wait_for(lambda: statuses_of(events, job_id)[-1:] == ["completed"], 5, "completed event")
    assert statuses_of(events, job_id)[:2] == ["pending", "running"]
    # ComfyUI keeps no history and no files of the job.
    with urllib.request.urlopen(f"{comfyui.url}/history/{result['prompt_id']}") as resp:
        assert json.load(resp) == {}
    assert not (comfyui.output_dir / job_id).exists()
    # Liveness keys.
    assert r.ttl(f"worker:{worker_env['WORKER_ID']}:heartbeat") > 0
    status = json.loads(r.get(f"worker:{worker_env['WORKER_ID']}:status"))
    assert status["jobs_completed"] == 1 and status["comfyui_version"]
    worker.stop()
    assert worker.process.returncode == 0


@both
def test_identical_workflows_each_get_their_own_files(r, comfyui, worker_env, start_worker):
    """ComfyUI answers a repeated prompt from cache; each job must still get its own file."""
    start_worker(worker_env)
    first = wait_job(r, submit(r, image_workflow(color=0x123456)))
    second = wait_job(r, submit(r, image_workflow(color=0x123456)))
    assert first["status"] == second["status"] == "completed"
    path1 = comfyui.outputs_root / first["result"]["outputs"][0]["path"]
    path2 = comfyui.outputs_root / second["result"]["outputs"][0]["path"]
    assert path1 != path2 and path1.is_file() and path2.is_file()


@both
def test_missing_model_fails_with_structured_node_errors(r, comfyui, worker_env, start_worker):
    start_worker(worker_env)
    wf = image_workflow()
    wf["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.ckpt"}}
    wf["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    wf["2"]["inputs"]["images"] = ["9", 0]  # SaveImage on a missing node too
    del wf["2"]
    doc = wait_job(r, submit(r, wf))
    assert doc["status"] == "failed"
    node_errors = doc["result"]["node_errors"]
    assert "4" in node_errors
    assert node_errors["4"]["errors"][0]["type"] == "value_not_in_list"
    assert node_errors["4"]["class_type"] == "CheckpointLoaderSimple"
    assert "value_not_in_list" in doc["error"]
    assert r.zscore("queue:failed", doc["id"]) is not None


@both
def test_node_errors_on_http_200_fail_the_job(r, comfyui, worker_env, start_worker):
    """One output valid, one not: ComfyUI answers 200 with node_errors and drops that output."""
    start_worker(worker_env)
    wf = image_workflow()
    wf["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.ckpt"}}
    wf["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    doc = wait_job(r, submit(r, wf))
    assert doc["status"] == "failed", doc
    assert doc["result"]["http_status"] == 200
    assert "4" in doc["result"]["node_errors"]


@both
def test_execution_error_reports_type_and_message(r, comfyui, worker_env, start_worker):
    start_worker(worker_env)
    wf = node_workflow("StandInRaise", message="boom at step 3", exception="ValueError")
    doc = wait_job(r, submit(r, wf))
    assert doc["status"] == "failed"
    assert "ValueError" in doc["error"] and "boom at step 3" in doc["error"]
    assert doc["result"]["error_kind"] == "execution_error"
    assert doc["result"]["node_id"] == "3"


@both
def test_cuda_out_of_memory_is_recognised(r, comfyui, worker_env, start_worker):
    start_worker(worker_env)
    doc = wait_job(r, submit(r, node_workflow("StandInOutOfMemory", allocate_mib=512.0)))
    assert doc["status"] == "failed"
    assert doc["result"]["error_kind"] == "out_of_memory"
    assert doc["error"].startswith("GPU out of memory")


def test_dropped_websocket_falls_back_to_polling(r, comfyui, worker_env, start_worker):
    start_worker(worker_env)
    wf = node_workflow("StandInDropWebSockets", refuse_seconds=1.0, seconds=0.3)
    doc = wait_job(r, submit(r, wf), t=30)
    assert doc["status"] == "completed", doc
    # The worker reconnects and carries on.
    assert wait_job(r, submit(r, image_workflow()))["status"] == "completed"


@both
def test_job_timeout_interrupts_prompt(r, comfyui, worker_env, start_worker):
    worker_env.update(WORKER_JOB_TIMEOUT="1.5", COMFYUI_TIMEOUT="1")
    start_worker(worker_env)
    doc = wait_job(r, submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600)))
    assert doc["status"] == "failed"
    assert doc["result"]["error_kind"] == "timeout"
    assert "WORKER_JOB_TIMEOUT" in doc["error"] and "stopped within" in doc["error"]
    assert wait_job(r, submit(r, image_workflow()))["status"] == "completed"


def test_slow_interrupt_within_grace_needs_no_restart(r, comfyui, worker_env, start_worker):
    worker_env.update(WORKER_JOB_TIMEOUT="1", COMFYUI_TIMEOUT="1", WORKER_INTERRUPT_GRACE="10")
    start_worker(worker_env)
    doc = wait_job(r, submit(r, node_workflow("StandInSlowInterrupt", seconds=3.0)))
    assert doc["status"] == "failed" and "stopped within" in doc["error"], doc
    assert "restarted" not in doc["error"]


def test_prompt_ignoring_interrupt_gets_comfyui_restarted(r, worker_env, start_worker, tmp_path):
    """The container case: the worker supervises ComfyUI and restarts it when it will not stop."""
    managed_comfyui(worker_env, tmp_path / "managed").update(
        WORKER_JOB_TIMEOUT="1.5",
        COMFYUI_TIMEOUT="1",
        WORKER_INTERRUPT_GRACE="1",
    )
    worker = start_worker(worker_env)
    doc = wait_job(r, submit(r, node_workflow("StandInHang")), t=40)
    assert doc["status"] == "failed"
    assert "restarted" in doc["error"] and "WORKER_INTERRUPT_GRACE" in doc["error"]
    assert wait_job(r, submit(r, image_workflow()), t=40)["status"] == "completed"
    worker.stop()
    assert worker.process.returncode == 0
    assert "restarted ComfyUI" in worker.log()


@both
def test_cancelled_running_job_is_interrupted(r, comfyui, worker_env, start_worker, events):
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600))
    wait_job(r, job_id, ("running",))
    time.sleep(0.3)
    doc = job(r, job_id)
    doc["status"] = "cancelled"
    r.set(f"job:{job_id}", json.dumps(doc))  # what the platform does, and nothing else
    wait_for(lambda: r.zscore("queue:running", job_id) is None, 10, "job off queue:running")
    assert job(r, job_id)["status"] == "cancelled"
    assert r.zscore("queue:failed", job_id) is None
    worker.wait_log("cancelled through the platform")
    assert wait_job(r, submit(r, image_workflow()))["status"] == "completed"


def test_jobs_left_running_by_a_crash_go_back_and_run(r, comfyui, worker_env, start_worker):
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600), priority=1)
    score = r.zscore("queue:pending", job_id)
    wait_job(r, job_id, ("running",))
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.wait()
    assert job(r, job_id)["status"] == "running"
    doc = job(r, job_id)
    doc["workflow"] = image_workflow()
    r.set(f"job:{job_id}", json.dumps(doc))
    # Same worker id again, with its ComfyUI away: it recovers the job but cannot run it, so
    # the job is seen back in the queue with its original score and one attempt counted.
    away = start_worker({**worker_env, "COMFYUI_URL": f"http://127.0.0.1:{free_port()}"}, "away")
    wait_for(lambda: job(r, job_id)["status"] == "pending", 15, "the job back in the queue")
    assert r.zscore("queue:pending", job_id) == score
    assert job(r, job_id)["metadata"]["attempts"] == 1
    assert job(r, job_id)["metadata"]["attempted_by"] == [worker_env["WORKER_ID"]]
    assert "left running by a previous run" in away.log()
    away.stop()
    start_worker(worker_env, "back")
    assert wait_job(r, job_id)["status"] == "completed"


def test_sigterm_finishes_the_current_job(r, comfyui, worker_env, start_worker):
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=1.5, steps=15))
    wait_job(r, job_id, ("running",))
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert job(r, job_id)["status"] == "completed"
    # It took no more jobs after the signal.
    assert r.exists(f"worker:{worker_env['WORKER_ID']}:heartbeat")


def test_sigterm_past_grace_puts_job_back(r, comfyui, worker_env, start_worker):
    worker_env["WORKER_SHUTDOWN_GRACE"] = "0.5"
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600), priority=3)
    score = r.zscore("queue:pending", job_id)
    wait_job(r, job_id, ("running",))
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    doc = job(r, job_id)
    assert doc["status"] == "pending" and doc["worker_id"] is None
    assert r.zscore("queue:pending", job_id) == score
    assert r.zscore("queue:running", job_id) is None


@pytest.mark.parametrize("user_id", ["../x", "/etc", "", "a\0b", "a/b", "..", None])
def test_unsafe_user_id_never_writes_outside_outputs(r, comfyui, worker_env, start_worker, user_id):
    before = {p for p in comfyui.base_dir.rglob("*")}
    start_worker(worker_env)
    doc = wait_job(r, submit(r, image_workflow(), user_id=user_id))
    assert doc["status"] == "failed"
    assert "safe path segment" in doc["error"]
    after = {p for p in comfyui.base_dir.rglob("*")}
    created = {p for p in after - before if not p.name.endswith(".log")}
    assert all(comfyui.outputs_root in p.parents for p in created), created
    assert not Path("/x").exists()


def test_bad_jobs_fail_clearly_and_the_worker_carries_on(r, comfyui, worker_env, start_worker):
    worker_env["WORKER_MAX_JOB_BYTES"] = "20000"
    start_worker(worker_env)
    malformed = submit(r, raw=b'{"id": "x", "workflow": {', job_id="0" * 8)
    not_object = submit(r, workflow=["not", "an", "object"])
    missing = submit(r, workflow=None)
    r.set(f"job:{missing}", json.dumps({**job(r, missing), "workflow": None}))
    ui_format = submit(r, workflow={"nodes": [], "links": []})
    huge = submit(r, workflow={**image_workflow(), "9": {"class_type": "x" * 30000, "inputs": {}}})
    good = submit(r, image_workflow())
    expect = {
        malformed: "malformed",
        not_object: "must be a JSON object",
        missing: "no workflow",
        ui_format: "class_type",
        huge: "WORKER_MAX_JOB_BYTES",
    }
    for job_id, text in expect.items():
        doc = wait_job(r, job_id)
        assert doc["status"] == "failed" and text in doc["error"], doc
        assert r.zscore("queue:failed", job_id) is not None
    assert wait_job(r, good)["status"] == "completed"
    assert job(r, malformed)["id"] == malformed  # contract-shaped again


def test_priority_then_fifo_order(r, comfyui, worker_env, start_worker):
    ids = [submit(r, image_workflow(), priority=p, publish=False) for p in (3, 2, 0, 2)]
    start_worker(worker_env)
    for job_id in ids:
        wait_job(r, job_id)
    started = sorted(ids, key=lambda i: job(r, i)["started_at"])
    assert started == [ids[2], ids[1], ids[3], ids[0]]


def test_job_without_an_event_is_found_by_the_fallback_poll(r, comfyui, worker_env, start_worker):
    """The queue-manager's event can be lost (its publish bug); the slow poll finds the job."""
    worker = start_worker(worker_env)
    wait_for(lambda: r.exists(f"worker:{worker_env['WORKER_ID']}:status"), 10, "worker start")
    time.sleep(0.3)
    job_id = submit(r, image_workflow(), publish=False)
    assert wait_job(r, job_id)["status"] == "completed"
    assert worker.process.poll() is None


def test_round_robin_prefers_user_with_fewest_completions(r, comfyui, worker_env, start_worker):
    r.set("user:busy:completed", 5)
    busy = [submit(r, image_workflow(), user_id="busy", publish=False) for _ in range(2)]
    quiet = [submit(r, image_workflow(), user_id="quiet", publish=False) for _ in range(2)]
    worker_env["QUEUE_MODE"] = "round_robin"
    start_worker(worker_env)
    for job_id in busy + quiet:
        wait_job(r, job_id)
    order = sorted(busy + quiet, key=lambda i: job(r, i)["started_at"])
    assert order[:2] == quiet


def test_heartbeat_stays_alive_during_a_long_job(r, comfyui, worker_env, start_worker):
    worker_env.update(HEARTBEAT_TTL="2", HEARTBEAT_INTERVAL="0.5")
    start_worker(worker_env)
    key = f"worker:{worker_env['WORKER_ID']}:heartbeat"
    job_id = submit(r, node_workflow("StandInSleep", seconds=4.0, steps=40))
    wait_job(r, job_id, ("running",))
    status_key = f"worker:{worker_env['WORKER_ID']}:status"
    wait_for(lambda: json.loads(r.get(status_key)).get("current_job") == job_id, 3, "status update")
    assert json.loads(r.get(status_key))["state"] == "running"
    for _ in range(6):
        time.sleep(0.5)
        assert r.exists(key), "heartbeat expired during the job"
    assert wait_job(r, job_id)["status"] == "completed"


def _vram_env(worker_env: dict, tmp_path: Path, **gpu) -> Path:
    state = tmp_path / "nvml.json"
    state.write_text(json.dumps({"total_mb": 81559, "free_mb": 80000, "name": "Fake H100", **gpu}))
    worker_env.update(PYTHONPATH=str(FAKES), FAKE_NVML_FILE=str(state), VRAM_CHECK="on")
    return state


def test_job_that_can_never_fit_fails_with_both_numbers(
    r, comfyui, worker_env, start_worker, tmp_path
):
    _vram_env(worker_env, tmp_path, total_mb=24000, free_mb=23000)
    start_worker(worker_env)
    doc = wait_job(r, submit(r, image_workflow(), metadata={"estimated_vram": 30000}))
    assert doc["status"] == "failed" and doc["result"]["error_kind"] == "vram"
    assert "31024 MiB" in doc["error"] and "24000 MiB" in doc["error"]


def test_short_vram_puts_job_back_with_original_score(
    r, comfyui, worker_env, start_worker, tmp_path
):
    state = _vram_env(worker_env, tmp_path, free_mb=2000)
    worker_env.update(VRAM_BACKOFF="5", VRAM_BACKOFF_MAX="5")
    worker = start_worker(worker_env)
    job_id = submit(r, image_workflow(), metadata={"estimated_vram": 8000})
    score = r.zscore("queue:pending", job_id)
    worker.wait_log("put job")
    doc = job(r, job_id)
    assert doc["status"] == "pending" and doc["worker_id"] is None
    assert r.zscore("queue:pending", job_id) == score
    status = json.loads(r.get(f"worker:{worker_env['WORKER_ID']}:status"))
    assert status["vram"]["free_mb"] == 2000
    # Memory frees up: after its backoff the worker takes the job again and runs it.
    state.write_text(json.dumps({"total_mb": 81559, "free_mb": 80000}))
    assert wait_job(r, job_id, t=20)["status"] == "completed"


def test_redis_down_at_start_then_up(worker_env, start_worker, tmp_path, comfyui):
    port = free_port()
    worker_env.update(REDIS_PORT=str(port), REDIS_PASSWORD="s3cret-pw", LOG_LEVEL="DEBUG")
    worker = start_worker(worker_env)
    time.sleep(2.5)  # several retries
    log = worker.log()
    assert log.count("redis is down") == 1, log
    assert worker.process.poll() is None
    server = start_redis(port=port, password="s3cret-pw")
    try:
        client = server.client()
        job_id = submit(client, image_workflow())
        try:
            assert wait_job(client, job_id, t=20)["status"] == "completed"
        except AssertionError as exc:
            with urllib.request.urlopen(f"{comfyui.url}/queue") as resp:
                queue = resp.read().decode()[:2000]
            with urllib.request.urlopen(f"{comfyui.url}/history") as resp:
                queue += f"\nhistory: {list(json.load(resp))}"
            raise AssertionError(
                f"{exc}\nworker log:\n{worker.log()}\nComfyUI queue: {queue}"
            ) from None
        assert "s3cret-pw" not in worker.log()
    finally:
        worker.stop()
        server.stop()


def test_comfyui_down_then_up(r, worker_env, start_worker, tmp_path):
    server = comfy_server("standin", tmp_path / "late")
    worker_env.update(
        COMFYUI_URL=server.url,
        OUTPUTS_DIR=str(server.outputs_root),
        COMFYUI_OUTPUT_DIR=str(server.output_dir),
    )
    worker = start_worker(worker_env)
    job_id = submit(r, image_workflow())
    time.sleep(2)
    assert job(r, job_id)["status"] == "pending"  # never taken while ComfyUI is away
    assert worker.log().count("comfyui is down") == 1
    server.start()
    try:
        assert wait_job(r, job_id)["status"] == "completed"
    finally:
        worker.stop()
        server.stop()


def test_health_file_tracks_the_loop(r, comfyui, worker_env, start_worker):
    worker = start_worker(worker_env)
    health = Path(worker_env["HEALTH_FILE"])
    wait_for(health.exists, 10, "health file")
    first = json.loads(health.read_text())["ts"]
    wait_for(lambda: json.loads(health.read_text())["ts"] > first, 5, "health refresh")
    env = {**worker_env, "HEALTH_MAX_AGE": "5"}
    import subprocess
    import sys

    check = [sys.executable, str(Path(__file__).parents[1] / "healthcheck.py")]
    assert subprocess.run(check, env=env).returncode == 0
    worker.stop()
    assert subprocess.run(check, env=env, capture_output=True).returncode != 0


def test_json_logs_carry_worker_and_job_ids(r, comfyui, worker_env, start_worker):
    worker_env["LOG_FORMAT"] = "json"
    worker = start_worker(worker_env)
    job_id = submit(r, image_workflow())
    wait_job(r, job_id)
    worker.stop()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert lines and all(line["worker_id"] == worker_env["WORKER_ID"] for line in lines)
    assert any(line["job_id"] == job_id for line in lines)


def test_two_workers_share_a_queue_without_duplicates(r, comfyui, worker_env, start_worker):
    start_worker(worker_env, "a")
    start_worker({**worker_env, "WORKER_ID": worker_env["WORKER_ID"] + "b"}, "b")
    ids = [submit(r, image_workflow()) for _ in range(20)]
    docs = [wait_job(r, i) for i in ids]
    assert all(d["status"] == "completed" for d in docs)
    assert r.zcard("queue:completed") == 20 and r.zcard("queue:running") == 0
    # Each job reached ComfyUI exactly once (a job run twice ends "completed" all the same).
    assert set(prompts_per_job(comfyui, ids).values()) == {1}


def test_http_source_reports_with_correct_bodies(comfyui, worker_env, start_worker):
    """Against a minimal queue-manager that answers 422 to the old worker's bodies."""
    from aiohttp import web

    pending = [{"id": "j-1", "user_id": "bob", "workflow": image_workflow(), "metadata": {}}]
    reports: list[tuple[str, dict]] = []

    async def next_job(request):
        assert request.query["worker_id"] == worker_env["WORKER_ID"]
        return web.json_response({"job": pending.pop() if pending else None})

    async def complete(request):
        body = await request.json()
        if not isinstance(body.get("result"), dict):
            return web.json_response({"detail": "result required"}, status=422)
        reports.append(("complete", body))
        return web.json_response({"ok": True})

    async def fail(request):
        body = await request.json()
        if not isinstance(body.get("error"), str):
            return web.json_response({"detail": "error required"}, status=422)
        reports.append(("fail", body))
        return web.json_response({"ok": True})

    async def get_job(request):
        return web.json_response({"id": request.match_info["id"], "status": "running"})

    import asyncio

    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve():
        app = web.Application()
        app.router.add_get("/api/workers/next-job", next_job)
        app.router.add_post("/api/workers/complete-job", complete)
        app.router.add_post("/api/workers/fail-job", fail)
        app.router.add_get("/api/jobs/{id}", get_job)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()))
    thread.daemon = True
    thread.start()
    ready.wait(10)
    worker_env.update(
        QUEUE_SOURCE="http", QUEUE_MANAGER_URL=f"http://127.0.0.1:{port}", HTTP_POLL_INTERVAL="0.2"
    )
    worker = start_worker(worker_env)
    wait_for(lambda: reports, 20, "a report to the queue-manager")
    kind, body = reports[0]
    assert kind == "complete", body
    assert Path(body["result"]["outputs"][0]["path"]).parent.name == "j-1"  # relative path
    pending.append({"id": "j-2", "user_id": "../bob", "workflow": image_workflow()})
    wait_for(lambda: len(reports) == 2, 20, "the failure report")
    assert reports[1][0] == "fail" and "safe path segment" in reports[1][1]["error"]
    worker.stop()
    loop.call_soon_threadsafe(loop.stop)
