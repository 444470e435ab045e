"""What happened to this worker's jobs, in one place: its status record and Prometheus read it.

`JobEvents` is the hook the worker calls when a job is claimed, put back, refused or ended, when
its state changes and when it reads its GPU. It keeps the counts that `worker:{id}:status`
publishes and the Prometheus metrics (prometheus_client) that `/metrics` serves, so the two can
never disagree. GPU memory follows the names of NVIDIA's DCGM exporter (`..._DEV_FB_FREE`,
`..._DEV_FB_USED`, MiB, labels `gpu`, `modelName`, `Hostname`), so its Grafana dashboard's
panels work on them. The server is off unless METRICS_PORT is set; the play binds the published
port to the host's tailnet address only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from jobs import ClaimedJob, iso_to_unix
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

log = logging.getLogger("comfyui_worker.metrics")

OUTCOMES = ("completed", "failed", "cancelled")
STATES = (
    "starting",
    "idle",
    "running",
    "waiting_for_comfyui",
    "queue_unreachable",
    "vram_wait",
    "gpu_unreadable",
    "out_of_service",
    "stopped",
)
# Seconds: a workshop job waits minutes and runs from seconds to half an hour.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)


class JobEvents:
    """Counters of one worker; `counts` is what the status record shows."""

    def __init__(self, worker_id: str, hostname: str, version: str = "") -> None:
        self.worker_id, self.hostname = worker_id, hostname
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0, "requeued": 0}
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "comfyume_worker_jobs", "Jobs ended, by outcome", ["outcome"], registry=r
        )
        self.claims = Counter("comfyume_worker_claims", "Jobs claimed", registry=r)
        self.requeues = Counter(
            "comfyume_worker_requeues",
            "Jobs put back in the queue, by reason",
            ["reason"],
            registry=r,
        )
        self.refusals = Counter(
            "comfyume_worker_admission_refusals",
            "Jobs not admitted to run now, by reason",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "comfyume_worker_queue_wait_seconds",
            "From a job's creation to its claim by this worker",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "comfyume_worker_run_seconds",
            "From a job's claim to its end on this worker, by outcome",
            ["outcome"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "comfyume_worker_comfyui_restarts", "ComfyUI processes restarted", registry=r
        )
        self.reconnects = Counter(
            "comfyume_worker_websocket_reconnects", "ComfyUI websocket reconnects", registry=r
        )
        self.state = Gauge(
            "comfyume_worker_state", "1 for the worker's current state", ["state"], registry=r
        )
        gpu_labels = ["gpu", "modelName", "Hostname"]
        self.fb_free = Gauge(
            "comfyume_worker_DEV_FB_FREE", "Free GPU memory, MiB", gpu_labels, registry=r
        )
        self.fb_used = Gauge(
            "comfyume_worker_DEV_FB_USED", "Used GPU memory, MiB", gpu_labels, registry=r
        )
        self.build = Info("comfyume_worker_build", "Versions of the worker and ComfyUI", registry=r)
        self._version = version
        self._comfyui_version = ""
        self._seen = {"restarts": 0, "reconnects": 0}
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.jobs.labels(outcome)
        self.set_state("starting")
        self._publish_build()

    # -- the hook --------------------------------------------------------------------------

    def claimed(self, job: ClaimedJob) -> None:
        self.claims.inc()
        created = iso_to_unix((job.doc or {}).get("created_at"))
        if created is not None:
            self.queue_wait.observe(max(0.0, time.time() - created))

    def ended(self, outcome: str, job: ClaimedJob) -> None:
        self.counts[outcome] += 1
        self.jobs.labels(outcome).inc()
        self.run_time.labels(outcome).observe(max(0.0, time.monotonic() - job.claimed_at))

    def requeued(self, reason: str) -> None:
        self.counts["requeued"] += 1
        self.requeues.labels(reason).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def set_state(self, state: str) -> None:
        for name in STATES if state in STATES else (*STATES, state):
            self.state.labels(name).set(1 if name == state else 0)

    def gpu(self, reading: Any) -> None:
        labels = (str(reading.gpu_index), reading.name or "", self.hostname)
        self.fb_free.labels(*labels).set(reading.free_mb)
        self.fb_used.labels(*labels).set(reading.used_mb)

    def sync(self, restarts: int | None, reconnects: int, comfyui_version: str | None) -> None:
        """Counts kept elsewhere (the ComfyUI process and client), brought in at each scrape."""
        for name, counter, value in (
            ("restarts", self.restarts, restarts or 0),
            ("reconnects", self.reconnects, reconnects),
        ):
            if value > self._seen[name]:
                counter.inc(value - self._seen[name])
                self._seen[name] = value
        if comfyui_version and comfyui_version != self._comfyui_version:
            self._comfyui_version = comfyui_version
            self._publish_build()

    def _publish_build(self) -> None:
        self.build.info(
            {
                "worker_id": self.worker_id,
                "worker_version": self._version or "unknown",
                "comfyui_version": self._comfyui_version or "unknown",
            }
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """GET /metrics on METRICS_ADDRESS:METRICS_PORT, in the worker's event loop."""

    def __init__(self, events: JobEvents, before_scrape: Callable[[], None]) -> None:
        self.events = events
        self.before_scrape = before_scrape
        self._runner: web.AppRunner | None = None

    async def start(self, address: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, address, port).start()
        log.info("serving Prometheus metrics on %s:%d/metrics", address, port)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.before_scrape()
        return web.Response(
            body=self.events.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
