"""The GPU worker: takes jobs from the platform's queue, runs them in ComfyUI, reports back.

Run with `python3 worker.py` (configuration from the environment, see README.md). The loop
sleeps on queue events and on the ComfyUI websocket rather than polling, so a job's overhead is
a few milliseconds; slow polls remain only as safety nets. Every failure mode ends in one of
three places: the job is reported (completed, failed with a reason, cancelled), the job is put
back in the queue untouched (the worker or its GPU could not run it now), or the worker waits
with capped backoff for a dependency to return.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import logs
import privileges
import vram
from comfy_client import ComfyClient, ComfyUnavailable, Outcome, execution_failure
from config import Config, ConfigError
from exchange import ExchangeClient
from files import FileStages
from jobs import ClaimedJob, JobFailure, JobSource, SourceUnavailable, utc_now_iso
from logs import StateLog, job_id_var
from metrics import JobEvents, MetricsServer
from pipeline import JobRun, Stage, drive
from supervisor import ComfyProcess
from tasks import HelperFailed, keep_running

log = logging.getLogger("comfyui_worker")

# The worker's version, for its build-info metric and status record.
WORKER_VERSION = "0.12.0"

# After a second stop signal, ComfyUI gets this long to honour the interrupt.
FORCED_GRACE = 1.0
# A ComfyUI restarted because it ignored an interrupt gets this long to exit on SIGTERM.
RESTART_GRACE = 5.0
# The calls made once a prompt has stopped (or was given up on) are bounded by this.
AFTER_STOP_CALL_TIMEOUT = 2.0
# With GPU_REQUIRED, this many unreadable GPU readings in a row take the worker out of service.
GPU_MISSES = 2
# Failures that are the worker's or its GPU's, not the workflow's: the job goes back to the
# queue (an attempt), and WORKER_MAX_INFRA_FAILURES of them in a row take the worker out of
# service.
INFRA_KINDS = ("gpu", "comfyui")
# The exit code of a worker that took itself out of service: Docker restarts the container,
# which also gives it its GPU devices anew (CONTRACTS §3).
EXIT_OUT_OF_SERVICE = 3


class _Stop(Exception):
    """Raised inside a job when it must end early: timeout, cancellation or shutdown."""

    def __init__(self, reason: str, stopped: bool, waited: float, restarted: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stopped = stopped
        self.waited = waited
        self.restarted = restarted


class Backoff:
    """Capped exponential backoff: 0.5 s, 1 s, 2 s ... up to `cap`."""

    def __init__(self, cap: float, start: float = 0.5) -> None:
        self.cap, self.start, self.current = cap, start, start

    def next(self) -> float:
        value = self.current
        self.current = min(self.current * 2, self.cap)
        return value

    def reset(self) -> None:
        self.current = self.start


class Worker:
    """One worker process: one GPU, one ComfyUI, one job at a time."""

    def __init__(
        self,
        cfg: Config,
        source: JobSource,
        comfy: ComfyClient,
        probe: vram.VramProbe,
        comfy_process: ComfyProcess | None = None,
        vram_table: list[tuple[str, int]] | None = None,
        files: FileStages | None = None,
        exchange: ExchangeClient | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.comfy = comfy
        self.probe = probe
        self.comfy_process = comfy_process
        self.vram_table = vram_table or []
        if files is None:
            files, exchange = FileStages.from_config(cfg, comfy)
        self.files = files
        self.exchange = exchange
        # A transfer gives up once a stop's grace has run out; its files are kept, not lost.
        self.files.give_up_when(self.stop_grace_over)
        self.stages: list[Stage] = [
            ("validate", self.files.validate),
            ("admit", self._admit_stage),
            ("stage inputs", self.files.stage_inputs),
            ("run", self._run_prompt),
            ("collect", self.files.collect),
            ("deliver", self.files.deliver),
            ("report", self._report_completed),
        ]
        self.states = StateLog(log)
        self.stopping = asyncio.Event()
        # Set by a second stop signal: every wait of the current job ends now.
        self.forced = asyncio.Event()
        self.forced_at: float | None = None
        # Why the worker stopped by itself (a helper that kept failing); the exit code is 1.
        self.fatal: str | None = None
        # Why the worker took itself out of service (its GPU, or ComfyUI failing every job).
        self.out_of_service: str | None = None
        self._gpu_misses = 0
        self._infra_failures = 0
        self.state = "starting"
        self.current: ClaimedJob | None = None
        self.events = JobEvents(cfg.worker_id, socket.gethostname(), WORKER_VERSION)
        self.counts = self.events.counts  # what the status record shows, kept by the hook
        self.metrics: MetricsServer | None = None
        self.started_at = utc_now_iso()
        self._vram_backoff = Backoff(cfg.vram_backoff_max, cfg.vram_backoff)
        self._last_reading: vram.VramReading | None = None
        self._heartbeat_now = asyncio.Event()
        self._stop_deadline: float | None = None
        self._comfy_down_since: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First SIGTERM: finish the current job within WORKER_SHUTDOWN_GRACE; second: now."""
        if self.stopping.is_set():
            self._stop_deadline = time.monotonic()
            self.forced_at = time.monotonic()
            self.forced.set()
            log.warning("second stop signal: giving up the current job now")
            return
        log.info(
            "stop requested: taking no more jobs%s",
            f"; finishing job {self.current.id} within {self.cfg.shutdown_grace:g} s"
            if self.current
            else "",
        )
        self._stop_deadline = time.monotonic() + self.cfg.shutdown_grace
        self.stopping.set()

    def stop_grace_over(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() >= self._stop_deadline

    async def run(self) -> None:
        """Start everything, recover orphaned jobs, then take jobs until asked to stop."""
        removed = self.files.stager.remove_all()
        if removed:
            log.info("removed the input folders of %d earlier job(s)", len(removed))
        for kept in self.files.delivery.keep_orphans():
            log.warning(
                "outputs of a job that an earlier run did not deliver are kept in %s",
                self.cfg.host_path(kept),
            )
        if self.comfy_process:
            await self.comfy_process.start()
        await self.source.start()
        await self.comfy.start()
        if self.exchange:
            await self.exchange.start()
        if self.cfg.metrics_port:
            self.metrics = MetricsServer(self.events, self._sync_metrics)
            await self.metrics.start(self.cfg.metrics_address, self.cfg.metrics_port)
        main = asyncio.create_task(self._main_loop(), name="main-loop")
        helpers = [
            asyncio.create_task(keep_running("heartbeat", self._heartbeat_loop), name="heartbeat"),
            asyncio.create_task(
                keep_running("health", lambda: self._health_loop(main)), name="health"
            ),
            asyncio.create_task(keep_running("orphans", self._orphan_loop), name="orphans"),
        ]
        watched = [*helpers, *self.source.helpers()]
        if self.comfy_process is not None:
            watched += self.comfy_process.helpers()
        try:
            await self._watch_helpers(main, watched)
            await main
        finally:
            self.state = "out_of_service" if self.out_of_service else "stopped"
            await self._final_heartbeat()
            for task in helpers:
                task.cancel()
            await asyncio.wait(helpers, timeout=5)
            await self.comfy.close()
            await self.source.close()
            if self.exchange:
                await self.exchange.close()
            if self.metrics:
                await self.metrics.close()
            if self.comfy_process:
                await self.comfy_process.stop()
            with contextlib.suppress(OSError):
                if self.out_of_service:  # the health check says why until the restart
                    self._write_health({"ts": 0, "out_of_service": self.out_of_service})
                else:
                    os.unlink(self.cfg.health_file)
            log.info(
                "stopped: %d completed, %d failed, %d cancelled, %d put back",
                self.counts["completed"],
                self.counts["failed"],
                self.counts["cancelled"],
                self.counts["requeued"],
            )

    async def _watch_helpers(self, main: asyncio.Task[None], helpers: list[asyncio.Task]) -> None:
        """Until the main loop ends: a helper that gave up stops the worker (exit code 1)."""
        pending = {main, *helpers}
        while not main.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {main}:
                if task.cancelled():
                    continue
                exc = task.exception()
                if isinstance(exc, HelperFailed):
                    self.fatal = str(exc)
                elif exc is not None:
                    self.fatal = f"the {task.get_name()} task failed: {type(exc).__name__}: {exc}"
                else:
                    continue
                log.error("stopping the worker: %s", self.fatal)
                self.request_stop()

    def _sync_metrics(self) -> None:
        restarts = self.comfy_process.restarts if self.comfy_process else None
        self.events.sync(restarts, getattr(self.comfy, "reconnects", 0), self.comfy.version)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _until_stopped(self, aw: Awaitable[Any], timeout: float) -> None:
        """Await `aw` for at most `timeout`, returning early when a stop is requested."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stop):
                if not t.done():
                    t.cancel()
            await asyncio.gather(task, stop, return_exceptions=True)

    async def _recover(self) -> None:
        backoff = Backoff(self.cfg.backoff_max)
        while not self.stopping.is_set():
            try:
                recovered = await self.source.recover()
            except SourceUnavailable:
                self._set_state("queue_unreachable")  # not "starting": the health check says so
                await self._sleep_or_stop(backoff.next())
                continue
            if recovered:
                log.warning(
                    "put back %d job(s) left running by a previous run: %s",
                    len(recovered),
                    ", ".join(recovered),
                )
            return

    async def _main_loop(self) -> None:
        await self._recover()
        backoff = Backoff(self.cfg.backoff_max)
        while not self.stopping.is_set():
            if not self.comfy.connected.is_set():
                self._set_state("waiting_for_comfyui")
                await self._restart_if_unresponsive()
                await self._until_stopped(self.comfy.connected.wait(), self.cfg.backoff_max)
                continue
            self._comfy_down_since = None
            if self.files.extra_file_inputs is None:
                # Which inputs name files must be known before any job is checked.
                try:
                    await self.files.discover()
                except ComfyUnavailable as exc:
                    log.warning("could not read ComfyUI's /object_info (%s); asking again", exc)
                    self._set_state("waiting_for_comfyui")
                    await self._sleep_or_stop(backoff.next())
                    continue
            gpu_unknown = self._gpu_misses or self._last_reading is None
            if self.cfg.gpu_required and gpu_unknown and await self._read_gpu() is None:
                # No job is taken on a GPU that cannot be read.
                self._set_state("gpu_unreadable")
                await self._sleep_or_stop(min(1.0, self.cfg.heartbeat_interval))
                continue
            try:
                job = await self.source.claim()
            except SourceUnavailable:
                self._set_state("queue_unreachable")
                await self._sleep_or_stop(backoff.next())
                continue
            backoff.reset()
            if job is None:
                self._set_state("idle")
                await self._until_stopped(
                    self.source.wait_for_work(self.cfg.queue_poll_interval),
                    self.cfg.queue_poll_interval,
                )
                continue
            await self._process(job)

    async def _restart_if_unresponsive(self) -> None:
        """A managed ComfyUI that does not answer within COMFYUI_START_TIMEOUT is restarted."""
        now = time.monotonic()
        if self._comfy_down_since is None:
            self._comfy_down_since = now
            return
        if self.comfy_process and now - self._comfy_down_since > self.cfg.comfyui_start_timeout:
            log.error(
                "ComfyUI has not answered for %.0f s (COMFYUI_START_TIMEOUT); restarting it",
                now - self._comfy_down_since,
            )
            await self.comfy_process.restart()
            self._comfy_down_since = time.monotonic()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.events.set_state(state)
            self._heartbeat_now.set()

    # -- one job ---------------------------------------------------------------------------

    async def _process(self, job: ClaimedJob) -> None:
        token = job_id_var.set(job.id)
        self.current = job
        if hasattr(self.source, "current_job_id"):
            self.source.current_job_id = job.id  # type: ignore[attr-defined]
        self._set_state("running")
        self.events.claimed(job)
        log.info("claimed job (user %s)", job.user_id)
        try:
            await drive(self.stages, JobRun(job))
            self._infra_failures = 0
        except JobFailure as failure:
            failure = self.files.scrub(job, failure)
            if failure.kind in INFRA_KINDS:
                await self._infra_failure(job, failure)
            else:
                self._infra_failures = 0
                await self._report_failure(job, failure)
        except Exception as exc:  # a bug must fail one job, not the worker
            log.exception("internal error while running the job")
            failure = JobFailure("internal", f"worker internal error: {type(exc).__name__}: {exc}")
            await self._report_failure(job, self.files.scrub(job, failure))
        finally:
            self.current = None
            if hasattr(self.source, "current_job_id"):
                self.source.current_job_id = None  # type: ignore[attr-defined]
            job_id_var.reset(token)

    async def _infra_failure(self, job: ClaimedJob, failure: JobFailure) -> None:
        """Not the workflow's fault: back to the queue for another worker, not counted against
        the job (this worker's failures are counted here, and take it out of service)."""
        self._infra_failures += 1
        reason = f"{failure.message} (on worker {self.cfg.worker_id})"
        if not await self._put_back(job, reason, failure.kind):
            await self._report_failure(job, failure)
        if self._infra_failures >= self.cfg.max_infra_failures:
            self.take_out_of_service(
                f"{self._infra_failures} jobs in a row failed for reasons that are not their "
                f"workflows' (WORKER_MAX_INFRA_FAILURES={self.cfg.max_infra_failures}); "
                f"last: {failure.message.splitlines()[0]}"
            )

    def take_out_of_service(self, reason: str) -> None:
        """Stop claiming, say why (status, health file, log) and exit so Docker restarts us."""
        if self.out_of_service:
            return
        self.out_of_service = reason
        log.error(
            "out of service: %s. The worker takes no more jobs and exits (code %d) so that "
            "Docker restarts its container",
            reason,
            EXIT_OUT_OF_SERVICE,
        )
        self._set_state("out_of_service")
        self.request_stop()

    async def _read_gpu(self) -> vram.VramReading | None:
        """One reading of this worker's GPU; with GPU_REQUIRED, a GPU that cannot be read
        GPU_MISSES times in a row takes the worker out of service."""
        reading = await self.probe.aread()
        if reading is not None:
            self._last_reading = reading
            self._gpu_misses = 0
            self.events.gpu(reading)
            return reading
        if self.cfg.gpu_required and not getattr(self.probe, "skipped", False):
            self._gpu_misses += 1
            self.states.set("gpu", "unreadable", str(self.probe.last_error), logging.WARNING)
            if self._gpu_misses >= GPU_MISSES:
                self.take_out_of_service(
                    f"GPU {self.cfg.gpu_index} cannot be read ({self.probe.last_error}) and "
                    "GPU_REQUIRED=true"
                )
        return None

    async def _admit_stage(self, run: JobRun) -> bool:
        return await self._admit(run.job)

    async def _run_prompt(self, run: JobRun) -> bool:
        """Submit the prompt and see it to its end; False when it was stopped early."""
        job = run.job
        while True:
            try:
                await self._unless_forced(self.comfy.submit(run.workflow, job.prompt_id))
                log.debug("queued prompt %s in ComfyUI", job.prompt_id)
                break
            except ComfyUnavailable as exc:
                if await self._put_back(job, f"ComfyUI unreachable ({exc})", "comfyui_unreachable"):
                    return False
                await self._until_stopped(self.comfy.connected.wait(), self.cfg.backoff_max)
                if self._deadline_passed(job):
                    raise JobFailure(
                        "comfyui", "ComfyUI stayed unreachable until the job timed out"
                    ) from exc

        async def forget_history() -> None:
            with contextlib.suppress(ComfyUnavailable):
                await self.comfy.delete_history(job.prompt_id)

        try:
            outcome = await self._supervise(job)
        except _Stop as stop:
            await self._after_stop(job, stop)
            return False
        run.cleanups.append(forget_history)
        log.debug("prompt %s ended: %s", job.prompt_id, outcome.status)
        if outcome.status == "error":
            failure = execution_failure(outcome.error or {})
            if failure.kind == "out_of_memory":
                with contextlib.suppress(ComfyUnavailable):
                    await self.comfy.free()
            raise failure
        if outcome.status == "interrupted":
            raise JobFailure("interrupted", "the prompt was interrupted in ComfyUI by someone else")
        run.outcome = outcome
        return True

    async def _unless_forced(self, call: Awaitable[Any]) -> Any:
        """`call`, given up (as ComfyUI unavailable) when a second stop signal comes."""
        task = asyncio.ensure_future(call)
        forced = asyncio.ensure_future(self.forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ComfyUnavailable("given up at a second stop signal")
        return task.result()

    def _deadline_passed(self, job: ClaimedJob) -> bool:
        return time.monotonic() - job.claimed_at >= self.cfg.job_timeout

    async def _report_completed(self, run: JobRun) -> bool:
        job, outcome = run.job, run.outcome
        assert outcome is not None
        result = {
            "outputs": self.files.published(run),
            "output_dir": f"{job.user_id}/{job.id}",
            "prompt_id": job.prompt_id,
            "execution_ms": outcome.execution_ms,
            "duration_ms": round((time.monotonic() - job.claimed_at) * 1000, 1),
            "stages_ms": run.timings_ms,
            "worker_id": self.cfg.worker_id,
            "comfyui_version": self.comfy.version,
        }
        verdict = await self._persist(lambda: self.source.complete(job, result))
        if verdict == "ok":
            self.events.ended("completed", job)
            log.info(
                "completed: %d output(s) in %s, ComfyUI ran %s ms",
                len(run.files),
                result["output_dir"],
                None if outcome.execution_ms is None else round(outcome.execution_ms),
            )
        elif verdict == "cancelled":
            self.events.ended("cancelled", job)
            log.info("finished, but the job was cancelled meanwhile")
        else:
            log.warning("finished, but the job is no longer ours to report (%s)", verdict)
        return True

    async def _report_failure(self, job: ClaimedJob, failure: JobFailure) -> None:
        verdict = await self._persist(
            lambda: self.source.fail(job, failure.message, failure.result())
        )
        if verdict == "ok":
            self.events.ended("failed", job)
            log.warning("failed (%s): %s", failure.kind, failure.message.splitlines()[0])
        elif verdict == "cancelled":
            self.events.ended("cancelled", job)
            log.info("job was cancelled")
        else:
            log.warning("failed (%s), but the job is no longer ours to report", failure.kind)

    async def _persist(self, call: Callable[[], Awaitable[str]]) -> str:
        """Report to the queue, retrying while it is down; gives up only at a forced stop."""
        backoff = Backoff(self.cfg.backoff_max)
        while True:
            try:
                return await call()
            except SourceUnavailable:
                if self.forced.is_set() or (
                    self._stop_deadline is not None
                    and time.monotonic() >= self._stop_deadline + self.cfg.interrupt_grace
                ):
                    log.error("queue unreachable at shutdown; the job stays running for recovery")
                    return "unreported"
                with contextlib.suppress(asyncio.TimeoutError):  # a second signal ends the wait
                    await asyncio.wait_for(self.forced.wait(), backoff.next())

    async def _put_back(self, job: ClaimedJob, reason: str, kind: str = "other") -> bool:
        """Requeue with the original score; False when the source cannot (HTTP API)."""
        try:
            verdict = await self._persist(lambda: self.source.requeue(job, reason))
        except SourceUnavailable:
            verdict = False
        # "unreported" (the queue was down at a forced stop) is not a put-back: the job stays
        # running under this worker and goes back when the worker (or a live one) recovers it.
        ok = verdict is True
        if ok:
            self.events.requeued(kind)
        return ok

    # -- VRAM admission --------------------------------------------------------------------

    async def _admit(self, job: ClaimedJob) -> bool:
        """True to run now; False when the job went back to the queue (or the wait ran out)."""
        if self.cfg.vram_check == "off":
            return True
        need = vram.estimate(
            job.doc, self.vram_table, self.cfg.vram_default_mb, self.cfg.vram_margin_mb
        )
        while True:
            verdict, reason = await self._measure(need)
            if verdict == "run":
                self._vram_backoff.reset()
                return True
            if verdict == "never":
                self.events.refused("vram_never")
                raise JobFailure("vram", reason, {"vram": need.as_dict()})
            if verdict == "gpu_lost":
                self.events.refused("gpu_unreadable")
                if not await self._put_back(job, reason, "gpu_unreadable"):
                    raise JobFailure("gpu", reason)
                if self.out_of_service is None:  # one miss so far: read again before the next
                    self._gpu_misses = max(self._gpu_misses, 1)
                return False
            self.events.refused("vram_short")
            delay = self._vram_backoff.next()
            verdict = await self._persist(
                lambda why=reason, wait=delay: self.source.retry(job, why, wait)
            )
            if verdict == "requeued":
                # Deferred by `delay` for every worker; the jobs behind it run meanwhile.
                self.events.requeued("vram")
                return False
            if verdict == "failed":
                self.events.ended("failed", job)
                log.warning("failed: %s, and the job reached WORKER_MAX_ATTEMPTS", reason)
                return False
            if verdict != "unsupported":  # cancelled, no longer ours, or unreported
                return False
            # The HTTP source cannot requeue: hold the job and measure again later.
            if self._deadline_passed(job) or self.stopping.is_set():
                raise JobFailure("vram", f"{reason}; gave up waiting for VRAM")
            self._set_state("vram_wait")
            await self._sleep_or_stop(delay)

    async def _measure(self, need: vram.Estimate) -> tuple[str, str]:
        reading = await self._read_gpu()
        if reading is None and self.cfg.gpu_required:
            # The job is not at fault: it goes back, not counted, for a worker with a GPU.
            return "gpu_lost", f"GPU {self.cfg.gpu_index} cannot be read ({self.probe.last_error})"
        if reading is None:
            if self.cfg.vram_check == "auto":
                self.states.set(
                    "gpu memory", "unreadable", f"{self.probe.last_error}; admitting jobs"
                )
                return "run", ""
            return "short", f"GPU memory cannot be read ({self.probe.last_error}) and VRAM_CHECK=on"
        self._last_reading = reading
        required = need.required_mb
        if required > reading.total_mb:
            return "never", (
                f"job needs {required} MiB of VRAM ({need.source} estimate {need.estimate_mb} MiB"
                f" + margin {need.margin_mb} MiB) but GPU {reading.gpu_index} has only "
                f"{reading.total_mb} MiB in total"
            )
        if reading.free_mb >= required:
            return "run", ""
        log.info(
            "VRAM short (%d MiB free, %d needed): asking ComfyUI to free its model cache",
            reading.free_mb,
            required,
        )
        with contextlib.suppress(ComfyUnavailable):
            await self.comfy.free()
        deadline = time.monotonic() + self.cfg.vram_free_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.2, self.cfg.vram_free_wait))
            reading = await self.probe.aread() or reading
            if reading.free_mb >= required:
                return "run", ""
        self._last_reading = reading
        return "short", (
            f"job needs {required} MiB of VRAM but GPU {reading.gpu_index} has {reading.free_mb} "
            f"of {reading.total_mb} MiB free after ComfyUI freed its cache "
            "(held by other processes)"
        )

    # -- watching a running prompt ---------------------------------------------------------

    async def _supervise(self, job: ClaimedJob) -> Outcome:
        """Wait for the prompt, ending it early on timeout, cancellation or a forced stop."""
        run = asyncio.ensure_future(self.comfy.wait(job.prompt_id))
        cancel = asyncio.ensure_future(self._watch_cancel(job))
        stop = asyncio.ensure_future(self.stopping.wait())
        forced = asyncio.ensure_future(self.forced.wait())
        deadline = job.claimed_at + self.cfg.job_timeout
        reason = None
        try:
            while True:
                limit = deadline
                if self.stopping.is_set() and self._stop_deadline is not None:
                    limit = min(limit, self._stop_deadline)
                waiting = {run, cancel} | {f for f in (stop, forced) if not f.done()}
                await asyncio.wait(
                    waiting,
                    timeout=max(0.0, limit - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if run.done():
                    return run.result()
                if cancel.done():
                    broken = cancel.cancelled() or cancel.exception() is not None
                    if not broken:
                        reason = "cancelled"
                    else:  # the watcher broke (a bug): that is no cancellation; watch again
                        log.error(
                            "the cancellation watcher ended: %r",
                            "cancelled" if cancel.cancelled() else cancel.exception(),
                        )
                        cancel = asyncio.ensure_future(self._watch_cancel(job))
                elif time.monotonic() >= deadline:
                    reason = "timeout"
                elif self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    reason = "shutdown"
                if reason:
                    break
        finally:
            for waiter in (cancel, stop, forced):
                waiter.cancel()
            await asyncio.wait({cancel, stop, forced}, timeout=2)
        return await self._stop_prompt(job, run, reason)

    async def _watch_cancel(self, job: ClaimedJob) -> None:
        """Returns only when the platform cancelled the job; anything else is logged, not a
        cancellation (a cancellation takes the job off queue:running)."""
        hint = self.source.cancel_hint()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hint.wait(), self.cfg.cancel_check_interval)
            hint.clear()
            try:
                if await self.source.is_cancelled(job):
                    return
            except SourceUnavailable:
                pass
            except Exception:
                log.exception("the cancellation check failed; checking again")
                await asyncio.sleep(self.cfg.cancel_check_interval)

    async def _stop_prompt(
        self, job: ClaimedJob, run: asyncio.Future[Outcome], reason: str
    ) -> Outcome:
        """Interrupt; if ComfyUI ignores it for WORKER_INTERRUPT_GRACE, restart it.

        Every call to ComfyUI here is bounded by what is left of the grace: a frozen ComfyUI
        answers nothing, and the client's own timeout (COMFYUI_TIMEOUT) is far longer.
        """
        grace = self.cfg.interrupt_grace
        if self.forced.is_set():
            grace = min(grace, FORCED_GRACE)
        log.info("interrupting the prompt in ComfyUI (%s)", reason)
        started = time.monotonic()
        deadline = started + grace

        def left() -> float:
            end = deadline
            if self.forced.is_set():  # a second stop signal during the grace: shorten it
                end = min(end, max(self.forced_at or started, started) + FORCED_GRACE)
            return max(0.0, end - time.monotonic())

        def ask() -> asyncio.Future[None]:
            asking = asyncio.ensure_future(self.comfy.interrupt(job.prompt_id, timeout=left()))
            asking.add_done_callback(lambda t: t.cancelled() or t.exception())
            return asking

        asking = ask()
        outcome = None
        stopped = False
        try:
            while left() > 0:
                await asyncio.wait({run}, timeout=min(0.2 if self.forced.is_set() else 1.0, left()))
                if run.done():
                    # JobFailure: ComfyUI dropped it from its queue before it ran.
                    with contextlib.suppress(JobFailure):
                        outcome = run.result()
                    stopped = True
                    break
                if asking.done():  # the prompt may have started just after the interrupt
                    asking = ask()
        finally:
            asking.cancel()
        waited = time.monotonic() - started
        if outcome is not None and outcome.status == "success" and reason == "timeout":
            return outcome  # it finished in the grace period after all
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        self.comfy.forget(job.prompt_id)
        restarted = False
        if not stopped:
            if self.comfy_process is not None:
                log.warning(
                    "ComfyUI did not stop within %.1f s of the interrupt; restarting it", waited
                )
                await self.comfy_process.restart(RESTART_GRACE)
                self.comfy.connected.clear()
                restarted = True
            else:
                log.warning(
                    "ComfyUI did not stop within %.1f s of the interrupt; asking it to free "
                    "memory (it is not managed by this worker)",
                    waited,
                )
                with contextlib.suppress(ComfyUnavailable):
                    await self.comfy.free(timeout=AFTER_STOP_CALL_TIMEOUT)
        else:
            with contextlib.suppress(ComfyUnavailable):
                await self.comfy.delete_history(job.prompt_id, timeout=AFTER_STOP_CALL_TIMEOUT)
        raise _Stop(reason, stopped, waited, restarted)

    async def _after_stop(self, job: ClaimedJob, stop: _Stop) -> None:
        if stop.stopped:
            how = f"interrupted the prompt in ComfyUI, which stopped within {stop.waited:.1f} s"
        elif stop.restarted:
            how = (
                f"ComfyUI did not stop within {stop.waited:.1f} s of the interrupt "
                f"(WORKER_INTERRUPT_GRACE={self.cfg.interrupt_grace:g}), so the worker restarted it"
            )
        else:
            how = (
                f"ComfyUI did not stop within {stop.waited:.1f} s of the interrupt "
                f"(WORKER_INTERRUPT_GRACE={self.cfg.interrupt_grace:g}); it is not managed by "
                "this worker (COMFYUI_START=false) and was left running"
            )
        if stop.reason == "cancelled":
            with contextlib.suppress(SourceUnavailable):
                await self.source.mark_cancelled(job)
            self.events.ended("cancelled", job)
            log.info("cancelled through the platform; %s", how)
        elif stop.reason == "shutdown":
            if not await self._put_back(job, f"worker stopping; {how}", "shutdown"):
                await self._report_failure(
                    job, JobFailure("shutdown", f"worker stopped before the job finished; {how}")
                )
        else:
            raise JobFailure(
                "timeout",
                f"job timed out after {self.cfg.job_timeout:g} s (WORKER_JOB_TIMEOUT); {how}",
            )

    # -- liveness --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `worker:{id}:status` record."""
        reading = self._last_reading
        return {
            "worker_id": self.cfg.worker_id,
            "state": self.state,
            "out_of_service": self.out_of_service,
            "current_job": self.current.id if self.current else None,
            "jobs_completed": self.counts["completed"],
            "jobs_failed": self.counts["failed"],
            "jobs_cancelled": self.counts["cancelled"],
            "jobs_requeued": self.counts["requeued"],
            "vram": reading.as_dict() if reading else None,
            "worker_version": WORKER_VERSION,
            "comfyui_version": self.comfy.version,
            "comfyui_connected": self.comfy.connected.is_set(),
            "comfyui_restarts": self.comfy_process.restarts if self.comfy_process else None,
            "queue_source": self.cfg.queue_source,
            "queue_mode": self.cfg.queue_mode,
            "gpu_index": self.cfg.gpu_index,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": utc_now_iso(),
        }

    async def _heartbeat_loop(self) -> None:
        """Refresh the heartbeat every HEARTBEAT_INTERVAL whatever the worker is doing."""
        while True:
            if self.cfg.vram_check != "off" or self.cfg.gpu_required:
                await self._read_gpu()
            with contextlib.suppress(SourceUnavailable):
                await self.source.heartbeat(self.status())
            self._heartbeat_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._heartbeat_now.wait(), self.cfg.heartbeat_interval)

    async def _orphan_loop(self) -> None:
        """Take over the jobs of workers that vanished (host gone, container removed)."""
        while not self.stopping.is_set():
            with contextlib.suppress(SourceUnavailable):
                await self.source.reap_orphans(self.cfg.orphan_grace)
            await self._sleep_or_stop(self.cfg.orphan_check_interval)

    async def _final_heartbeat(self) -> None:
        with contextlib.suppress(SourceUnavailable, Exception):
            await asyncio.wait_for(self.source.heartbeat(self.status()), 2)

    def _write_health(self, doc: dict[str, Any]) -> None:
        tmp = f"{self.cfg.health_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self.cfg.health_file)

    async def _health_loop(self, main: asyncio.Task[None]) -> None:
        """Writes HEALTH_FILE while the main loop lives; the HEALTHCHECK reads it."""
        while not main.done():
            doc = {
                "ts": time.time(),
                "state": self.state,
                "out_of_service": self.out_of_service,
                "pid": os.getpid(),
                "comfyui_connected": self.comfy.connected.is_set(),
                "current_job": self.current.id if self.current else None,
            }
            try:
                self._write_health(doc)
            except OSError as exc:
                self.states.set("health file", "unwritable", str(exc), logging.WARNING)
            await asyncio.sleep(self.cfg.health_interval)


def build(cfg: Config) -> Worker:
    """Wire the worker from configuration (tests build their own with other parts)."""
    states = StateLog(log)
    if cfg.queue_source == "http":
        from queue_http import HttpJobSource

        source: JobSource = HttpJobSource(cfg, states)
    else:
        from queue_redis import RedisJobSource

        source = RedisJobSource(cfg, states)
    comfy = ComfyClient(
        cfg.comfyui_url,
        client_id=f"comfyume-worker-{cfg.worker_id}",
        http_timeout=cfg.comfyui_timeout,
        poll_interval=cfg.comfyui_poll_interval,
        backoff_max=cfg.backoff_max,
        states=states,
    )
    try:
        table = vram.load_table(cfg.vram_table)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"VRAM_MODEL_TABLE: {exc}"]) from exc
    process = ComfyProcess(cfg, states) if cfg.comfyui_start else None
    worker = Worker(cfg, source, comfy, vram.VramProbe(cfg.gpu_index), process, table)
    worker.states = states
    return worker


def _redacted(cfg: Config) -> dict[str, Any]:
    doc = dataclasses.asdict(cfg)
    doc["redis_password"] = "***" if cfg.redis_password else ""
    doc["exchange_token"] = "***" if cfg.exchange_token else ""
    return doc


async def _amain(cfg: Config) -> int:
    worker = build(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    log.info(
        "starting: source=%s mode=%s comfyui=%s gpu=%d files=%s",
        cfg.queue_source,
        cfg.queue_mode,
        cfg.comfyui_url,
        cfg.gpu_index,
        f"exchange {cfg.exchange_url}"
        if cfg.output_delivery == "exchange"
        else f"local {cfg.outputs_dir}",
    )
    if cfg.queue_source == "redis" and not cfg.redis_password:
        log.warning("REDIS_PASSWORD is empty; the platform's Redis requires one")
    for name in ("REDIS_PASSWORD", "FILE_EXCHANGE_TOKEN"):
        if os.environ.get(name, "").strip():
            log.warning(
                "%s is set in the environment, which `docker inspect` shows: give it as a "
                "root-only file named by %s_FILE instead",
                name,
                name,
            )
    await worker.run()
    if worker.out_of_service:
        return EXIT_OUT_OF_SERVICE
    if worker.fatal:
        log.error("exiting with code 1: %s", worker.fatal)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the environment, print the configuration (secrets hidden) and exit",
    )
    args = parser.parse_args(argv)
    try:
        cfg = Config.from_env()
        if cfg.vram_table:
            vram.load_table(cfg.vram_table)
    except ConfigError as exc:
        print(f"comfyui-worker: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"comfyui-worker: invalid configuration:\n  VRAM_MODEL_TABLE: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(json.dumps(_redacted(cfg), indent=2))
        return 0
    # The secrets are read (Config.from_env); now, before anything else happens, become the
    # image's user and end non-dumpable, or stop.
    try:
        identity = privileges.drop(cfg.worker_user, os.environ)
    except privileges.PrivilegeError as exc:
        print(f"comfyui-worker: {exc}; stopping instead of running ComfyUI", file=sys.stderr)
        return 2
    logs.setup(cfg.worker_id, cfg.log_format, cfg.log_level)
    log.log(logging.WARNING if identity.uid == 0 else logging.INFO, "%s", identity.describe())
    try:
        return asyncio.run(_amain(cfg))
    except Exception:
        log.exception("worker crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
