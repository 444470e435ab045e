"""Faults the worker must survive: a frozen ComfyUI, a second stop signal, helpers that break,
a worker killed outside a container. Each test here failed on the worker before its fix.

Real processes (redis-server, the ComfyUI stand-in, `worker.py`) where the fault is a process's;
the worker's own units with small doubles where the fault is inside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from worker_testlib import (
    free_port,
    image_workflow,
    job,
    managed_comfyui,
    node_workflow,
    prompts_per_job,
    submit,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.integration


def managed(worker_env: dict, tmp_path: Path) -> dict:
    return managed_comfyui(worker_env, tmp_path / "managed")


def comfyui_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"started ComfyUI \(pid (\d+)\)", log)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_frozen_comfyui_is_restarted_within_the_interrupt_grace(
    r, worker_env, start_worker, tmp_path
):
    """SIGSTOP freezes ComfyUI: no call to it answers. Every call on the stop path must be
    bounded by the grace, not by COMFYUI_TIMEOUT (before: 3 x COMFYUI_TIMEOUT + 10 s)."""
    timeout, grace, client_timeout = 4.0, 2.0, 4.0
    managed(worker_env, tmp_path).update(
        WORKER_JOB_TIMEOUT=str(timeout),
        WORKER_INTERRUPT_GRACE=str(grace),
        COMFYUI_TIMEOUT=str(client_timeout),
        LOG_LEVEL="DEBUG",
    )
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600))
    worker.wait_log("queued prompt")  # frozen mid-prompt, not before it reached ComfyUI
    frozen = comfyui_pids(worker.log())[-1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        doc = wait_job(r, job_id, t=60)
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert doc["status"] == "failed" and doc["result"]["error_kind"] == "timeout", doc
    assert "restarted it" in doc["error"], doc["error"]
    # The restart followed the deadline within the grace and the restart's own few seconds;
    # one COMFYUI_TIMEOUT spent waiting on a frozen ComfyUI would already break this bound.
    started = _iso(doc["started_at"])
    ended = _iso(doc["completed_at"])
    assert ended - started < timeout + grace + client_timeout, (ended - started, worker.log())
    # The error states the time it really waited, not the configured grace.
    waited = float(re.search(r"did not stop within ([\d.]+) s", doc["error"]).group(1))
    assert grace - 0.5 <= waited <= grace + 1.5, doc["error"]
    assert not alive(frozen)
    after = submit(r, image_workflow())
    wait_for(lambda: job(r, after)["status"] == "completed", 60, lambda: worker.log()[-3000:])


def _iso(value: str) -> float:
    from jobs import iso_to_unix

    stamp = iso_to_unix(value)
    assert stamp is not None, value
    return stamp


def test_a_second_sigterm_acts_at_once(r, comfyui, worker_env, start_worker):
    grace = 30.0
    worker_env["WORKER_SHUTDOWN_GRACE"] = str(grace)
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSleep", seconds=60.0, steps=600))
    score = r.zscore("queue:pending", job_id)
    wait_job(r, job_id, ("running",))
    worker.signal(signal.SIGTERM)
    worker.wait_log("stop requested")
    second = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=grace) == 0
    # Before: the first grace was waited out (~30 s). Now the job is given up at once.
    assert time.monotonic() - second < grace / 3, worker.log()
    doc = job(r, job_id)
    assert doc["status"] == "pending" and r.zscore("queue:pending", job_id) == score
    assert "1 put back" in worker.log()


def test_worker_killed_outside_a_container_leaves_no_comfyui(r, worker_env, start_worker, tmp_path):
    managed(worker_env, tmp_path)
    worker = start_worker(worker_env)
    wait_for(lambda: comfyui_pids(worker.log()), 30, "ComfyUI to start")
    wait_job(r, submit(r, image_workflow()), t=30)
    child = comfyui_pids(worker.log())[-1]
    worker.process.kill()  # the worker alone, as the OOM killer or kill -9 would
    worker.wait()
    wait_for(lambda: not alive(child), 10, f"ComfyUI (pid {child}) to die with its worker")


def test_comfyui_left_on_the_port_by_an_earlier_run_is_stopped(
    r, worker_env, start_worker, tmp_path
):
    """A ComfyUI from an earlier run (recorded in the pid file) holds the port: the worker
    stops it before starting its own, instead of looping on "address already in use"."""
    managed(worker_env, tmp_path)
    import config
    import supervisor

    cfg = config.Config.from_env(worker_env)
    argv = supervisor.comfyui_command(cfg)
    leftover = subprocess.Popen(
        argv,
        cwd=worker_env["COMFYUI_DIR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        pid_file = Path(supervisor.ComfyProcess(cfg).pid_file)
        pid_file.write_text(json.dumps({"pid": leftover.pid, "argv": argv}))
        worker = start_worker(worker_env)
        worker.wait_log(f"stopping ComfyUI (pid {leftover.pid}) left running", timeout=20)
        assert leftover.wait(15) is not None
        assert wait_job(r, submit(r, image_workflow()), t=40)["status"] == "completed"
        assert "address already in use" not in worker.log()
        ours = comfyui_pids(worker.log())[-1]
        assert json.loads(pid_file.read_text())["pid"] == ours
        worker.stop()
        assert not pid_file.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_a_pid_file_naming_another_program_is_left_alone(tmp_path):
    """A recycled pid is someone else's process: only the exact recorded command line counts."""
    import config
    import supervisor

    bystander = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: supervisor._cmdline(bystander.pid) == ["sleep", "30"], 5, "sleep to run")
        cfg = config.Config(health_file=str(tmp_path / "h"), comfyui_dir=str(tmp_path))
        proc = supervisor.ComfyProcess(cfg)
        Path(proc.pid_file).write_text(
            json.dumps({"pid": bystander.pid, "argv": supervisor.comfyui_command(cfg)})
        )
        assert proc.leftover() is None  # its command line is not ComfyUI's
        Path(proc.pid_file).write_text(json.dumps({"pid": bystander.pid, "argv": ["sleep", "30"]}))
        assert proc.leftover() is None  # not the command line this worker runs
        proc.argv = ["sleep", "30"]
        assert proc.leftover() == bystander.pid
    finally:
        bystander.kill()
        bystander.wait()


# -- the worker's units, with doubles ------------------------------------------------------------


class _Source:
    """A job source double: records calls; behaviour set per test."""

    name = "double"

    def __init__(self) -> None:
        self.hint = asyncio.Event()
        self.cancel_checks = 0
        self.requeue_error: Exception | None = None

    def cancel_hint(self) -> asyncio.Event:
        return self.hint

    def helpers(self) -> list:
        return []

    async def is_cancelled(self, job) -> bool:
        self.cancel_checks += 1
        if self.cancel_checks == 1:
            raise RuntimeError("a bug in the cancellation check")
        return False

    async def requeue(self, job, reason: str) -> bool:
        if self.requeue_error:
            raise self.requeue_error
        return True


class _Comfy:
    """A ComfyUI client double whose prompt finishes after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.connected = asyncio.Event()
        self.version = "test"
        self.interrupts = 0

    async def wait(self, prompt_id: str):
        from comfy_client import Outcome

        await asyncio.sleep(self.seconds)
        return Outcome("success", {}, 1.0)

    async def interrupt(self, prompt_id: str, timeout: float | None = None) -> None:
        self.interrupts += 1


def _worker(tmp_path: Path, source, comfy, **settings):
    import config
    import vram
    import worker

    cfg = config.Config(
        outputs_dir=str(tmp_path / "outputs"),
        staging_dir=str(tmp_path / "staging"),
        health_file=str(tmp_path / "health"),
        cancel_check_interval=0.05,
        **settings,
    )
    return worker.Worker(cfg, source, comfy, vram.VramProbe(0))


def test_a_broken_cancellation_check_is_not_a_cancellation(tmp_path):
    """Before: any exception in the watcher ended it, and the job was treated as cancelled,
    which takes it off queue:running while its JSON still says running."""
    from jobs import ClaimedJob

    async def scenario():
        source, comfy = _Source(), _Comfy(seconds=0.5)
        w = _worker(tmp_path, source, comfy)
        outcome = await w._supervise(ClaimedJob(id="j1", doc={}, raw_size=2))
        return outcome, source, comfy

    outcome, source, comfy = asyncio.run(scenario())
    assert outcome.status == "success"
    assert comfy.interrupts == 0
    assert source.cancel_checks >= 2  # it kept watching after the failure


def test_an_unreported_put_back_is_not_counted(tmp_path):
    """At a forced stop with the queue down, the requeue cannot be recorded: the job stays
    running for recovery, and the worker must not count (or log) it as put back."""
    from jobs import ClaimedJob, SourceUnavailable

    async def scenario():
        source = _Source()
        source.requeue_error = SourceUnavailable("redis: down")
        w = _worker(tmp_path, source, _Comfy(0))
        w.request_stop()
        w.request_stop()  # forced: give up reporting at once
        ok = await asyncio.wait_for(w._put_back(ClaimedJob(id="j", doc={}, raw_size=2), "x"), 5)
        return ok, w.counts["requeued"]

    assert asyncio.run(scenario()) == (False, 0)


def test_a_helper_that_keeps_failing_stops_the_worker(tmp_path):
    from tasks import keep_running

    calls = []

    async def broken() -> None:
        calls.append(time.monotonic())
        raise ValueError("boom")

    async def scenario():
        w = _worker(tmp_path, _Source(), _Comfy(0))
        main = asyncio.create_task(w.stopping.wait())
        helper = asyncio.create_task(keep_running("heartbeat", broken, max_failures=3), name="hb")
        await asyncio.wait_for(w._watch_helpers(main, [helper]), 10)
        return w

    w = asyncio.run(scenario())
    assert len(calls) == 3  # restarted twice, then given up
    assert w.stopping.is_set()
    assert w.fatal and "heartbeat" in w.fatal and "ValueError: boom" in w.fatal


def test_a_helper_that_fails_once_is_started_again(caplog):
    from tasks import keep_running

    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("once")

    asyncio.run(asyncio.wait_for(keep_running("listener", flaky), 5))
    assert len(calls) == 2
    assert "the listener task failed" in caplog.text and "KeyError" in caplog.text


def test_websocket_reconnects_back_off_until_a_connection_holds():
    """A ComfyUI that accepts the websocket and drops it at once: before, every connect reset
    the delay to 50 ms, so the worker reconnected in a tight loop."""
    from aiohttp import web
    from comfy_client import ComfyClient

    async def scenario() -> int:
        connects = 0

        async def ws(request):
            nonlocal connects
            connects += 1
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            await sock.close()
            return sock

        async def stats(request):
            return web.json_response({"system": {"comfyui_version": "x"}})

        async def queue(request):
            return web.json_response({"queue_running": [], "queue_pending": []})

        app = web.Application()
        app.add_routes([web.get("/ws", ws), web.get("/system_stats", stats)])
        app.add_routes([web.get("/queue", queue)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = ComfyClient(f"http://127.0.0.1:{port}", "c", backoff_max=30)
        await client.start()
        await asyncio.sleep(2.0)
        await client.close()
        await runner.cleanup()
        return connects

    connects = asyncio.run(scenario())
    # 50 ms doubling: 0.05+0.1+0.2+0.4+0.8 = 1.55 s, so about 6 connections in 2 s; a loop
    # that never backs off makes dozens.
    assert 2 <= connects <= 8, connects


# -- the queue: VRAM deferrals, vanished workers --------------------------------------------------


def fake_gpu(worker_env: dict, free_mb: int) -> Path:
    """The fake NVML on the worker's PYTHONPATH, with an H100 of `free_mb` free; returns the
    state file a test rewrites to change the GPU mid-run."""
    state = Path(worker_env["HEALTH_FILE"]).with_name("nvml.json")
    state.write_text(json.dumps({"total_mb": 81559, "free_mb": free_mb, "name": "Fake H100"}))
    worker_env.update(PYTHONPATH=str(Path(__file__).parent / "fakes"), FAKE_NVML_FILE=str(state))
    return state


def test_a_small_job_runs_while_a_big_one_waits_for_vram(r, comfyui, worker_env, start_worker):
    """Before: the big job went back at its original score and the worker took it again first,
    so the small job behind it never ran. Now the big one is deferred; after
    WORKER_MAX_ATTEMPTS it fails, naming the worker and the limit."""
    fake_gpu(worker_env, free_mb=4000)
    worker_env.update(
        VRAM_CHECK="on",
        VRAM_FREE_WAIT="0",
        VRAM_BACKOFF="1",
        VRAM_BACKOFF_MAX="1",
        WORKER_MAX_ATTEMPTS="3",
        QUEUE_POLL_INTERVAL="0.5",
    )
    start_worker(worker_env)
    big = submit(r, image_workflow(), metadata={"estimated_vram": 8000})
    small = submit(r, image_workflow(), metadata={"estimated_vram": 1000})
    assert wait_job(r, small, t=30)["status"] == "completed"
    assert job(r, big)["status"] in ("pending", "running")  # still waiting its turn
    doc = wait_job(r, big, t=30)
    assert doc["status"] == "failed" and doc["result"]["error_kind"] == "attempts", doc
    assert "WORKER_MAX_ATTEMPTS=3" in doc["error"] and worker_env["WORKER_ID"] in doc["error"]
    assert "VRAM" in doc["error"]
    assert doc["metadata"]["attempts"] == 3


def test_a_vanished_workers_job_is_taken_over_by_a_live_one(r, comfyui, worker_env, start_worker):
    ttl, grace, poll = 2, 1.0, 0.5
    worker_env.update(
        HEARTBEAT_TTL=str(ttl),
        HEARTBEAT_INTERVAL="0.5",
        ORPHAN_GRACE=str(grace),
        ORPHAN_CHECK_INTERVAL=str(poll),
    )
    gone = start_worker(worker_env, "gone")
    job_id = submit(r, node_workflow("StandInSleep", seconds=1.0, steps=10))
    wait_job(r, job_id, ("running",))
    wait_for(lambda: prompts_per_job(comfyui, [job_id])[job_id] == 1, 10, "the prompt in ComfyUI")
    os.killpg(gone.process.pid, signal.SIGKILL)  # the host is gone: never restarted
    gone.wait()
    killed = time.monotonic()
    live = start_worker({**worker_env, "WORKER_ID": "live-worker"}, "live")
    doc = wait_job(r, job_id, t=30)
    taken_after = time.monotonic() - killed
    assert doc["status"] == "completed" and doc["worker_id"] == "live-worker", doc
    assert doc["metadata"]["attempts"] == 1
    assert doc["metadata"]["attempted_by"] == [worker_env["WORKER_ID"]]
    assert f"worker {worker_env['WORKER_ID']} vanished" in live.log()
    # Once by ComfyUI for the vanished worker, once for the live one: never by two live ones.
    assert prompts_per_job(comfyui, [job_id])[job_id] == 2
    print(f"taken over and completed {taken_after:.1f} s after the kill (TTL {ttl} s)")


# -- a worker that cannot do its work takes itself out of service --------------------------------


def _healthcheck(env: dict) -> subprocess.CompletedProcess:
    import sys

    check = [sys.executable, str(Path(__file__).parents[1] / "healthcheck.py")]
    return subprocess.run(check, env=env, capture_output=True, text=True)


def test_a_lost_gpu_takes_the_worker_out_of_service(r, comfyui, worker_env, start_worker):
    """CONTRACTS §3: containers lose their GPUs after a daemon-reload. Before: VRAM_CHECK=auto
    admitted every job with an unreadable GPU and the health check never looked."""
    state = fake_gpu(worker_env, free_mb=80000)
    worker_env.update(
        GPU_REQUIRED="true",
        VRAM_CHECK="auto",
        HEARTBEAT_TTL="4",
        HEARTBEAT_INTERVAL="0.5",
    )
    worker = start_worker(worker_env)
    assert wait_job(r, submit(r, image_workflow()))["status"] == "completed"
    state.write_text(json.dumps({"lost": True}))  # mid-run, as after `systemctl daemon-reload`
    job_id = submit(r, image_workflow())
    assert worker.wait(timeout=20) == 3  # Docker's restart policy starts it afresh
    doc = job(r, job_id)
    assert doc["status"] == "pending", doc  # not failed, and not counted against the job
    assert "attempts" not in (doc.get("metadata") or {})
    status = json.loads(r.get(f"worker:{worker_env['WORKER_ID']}:status"))
    assert status["state"] == "out_of_service"
    assert "GPU 0 cannot be read" in status["out_of_service"]
    assert "GPU is lost" in status["out_of_service"]
    assert "out of service: GPU 0 cannot be read" in worker.log()
    check = _healthcheck({**worker_env, "HEALTH_MAX_AGE": "60"})
    assert check.returncode == 1 and "out of service: GPU 0 cannot be read" in check.stdout


def test_repeated_gpu_faults_take_the_worker_out_of_service(r, comfyui, worker_env, start_worker):
    """A CUDA error is the GPU's fault, not the workflow's: the job goes back for another
    worker, and WORKER_MAX_INFRA_FAILURES of them in a row stop this one."""
    worker_env.update(WORKER_MAX_INFRA_FAILURES="2", WORKER_MAX_ATTEMPTS="2")
    worker = start_worker(worker_env)
    cuda = node_workflow(
        "StandInRaise", message="CUDA error: unspecified launch failure", exception="RuntimeError"
    )
    job_id = submit(r, cuda)
    assert worker.wait(timeout=30) == 3
    doc = job(r, job_id)
    # The worker's fault, not the job's: put back uncounted, for a worker with a good GPU.
    assert doc["status"] == "pending" and "attempts" not in (doc.get("metadata") or {}), doc
    status = json.loads(r.get(f"worker:{worker_env['WORKER_ID']}:status"))
    assert "WORKER_MAX_INFRA_FAILURES=2" in status["out_of_service"]
    assert "CUDA error" in status["out_of_service"]


def test_a_workflow_error_is_not_the_workers_fault(r, comfyui, worker_env, start_worker):
    worker_env.update(WORKER_MAX_INFRA_FAILURES="1")
    worker = start_worker(worker_env)
    doc = wait_job(
        r, submit(r, node_workflow("StandInRaise", message="bad input", exception="ValueError"))
    )
    assert doc["status"] == "failed" and doc["result"]["error_kind"] == "execution_error"
    assert wait_job(r, submit(r, image_workflow()))["status"] == "completed"
    assert worker.process.poll() is None


@pytest.mark.parametrize(
    ("exc_type", "message", "kind"),
    [
        ("RuntimeError", "CUDA error: unspecified launch failure", "gpu"),
        ("RuntimeError", "CUDA error: out of memory", "out_of_memory"),
        ("RuntimeError", "No CUDA GPUs are available", "gpu"),
        ("RuntimeError", "cudaErrorSystemNotReady: system not yet initialized", "gpu"),
        ("ValueError", "bad input", "execution_error"),
    ],
)
def test_gpu_faults_are_told_from_workflow_errors(exc_type, message, kind):
    from comfy_client import execution_failure

    failure = execution_failure({"exception_type": exc_type, "exception_message": message})
    assert failure.kind == kind


def test_nvidia_smi_runs_off_the_loop_and_backs_off(tmp_path):
    """A failing nvidia-smi (no NVML) is not run again at every reading: 1 s doubling to 60."""
    import vram

    calls = tmp_path / "calls"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho x >> {calls}\nexit 9\n")
    smi.chmod(0o755)

    class NoNvml:
        def nvmlInit(self):
            raise RuntimeError("no driver")

    probe = vram.VramProbe(0, nvml=NoNvml(), smi=str(smi))

    async def readings() -> list:
        return [await probe.aread() for _ in range(20)]

    assert asyncio.run(readings()) == [None] * 20
    assert len(calls.read_text().splitlines()) == 1
    assert "nvidia-smi" in probe.last_error


def test_a_second_sigterm_during_the_interrupt_grace_acts_at_once(
    r, worker_env, start_worker, tmp_path
):
    """The first signal's grace ran out and ComfyUI ignores the interrupt: a second signal
    must not wait out WORKER_INTERRUPT_GRACE. (Its own ComfyUI: the stuck node dies with it.)"""
    grace = 20.0
    managed(worker_env, tmp_path)
    worker_env.update(WORKER_SHUTDOWN_GRACE="0.5", WORKER_INTERRUPT_GRACE=str(grace))
    worker = start_worker(worker_env)
    job_id = submit(r, node_workflow("StandInSlowInterrupt", seconds=60.0))
    wait_job(r, job_id, ("running",))
    worker.signal(signal.SIGTERM)
    worker.wait_log("interrupting the prompt")
    second = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=grace + 10) == 0
    assert time.monotonic() - second < grace / 3, worker.log()
    assert job(r, job_id)["status"] == "pending"
