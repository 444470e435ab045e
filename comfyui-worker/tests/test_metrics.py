"""The job-events hook: one set of counters for the status record and for Prometheus."""

from __future__ import annotations

import json
import urllib.request

import pytest
from jobs import ClaimedJob, utc_now_iso
from metrics import JobEvents
from prometheus_client.parser import text_string_to_metric_families
from vram import VramReading
from worker_testlib import free_port, image_workflow, submit, wait_for, wait_job


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_the_hook_keeps_the_status_counts_and_the_metrics_together() -> None:
    events = JobEvents("w1", "gpu-host-1", "0.12.0")
    job = ClaimedJob(id="j", doc={"created_at": utc_now_iso()}, raw_size=2)
    events.claimed(job)
    events.ended("completed", job)
    events.ended("failed", job)
    events.requeued("vram")
    events.refused("vram_short")
    events.set_state("idle")
    events.gpu(VramReading(0, 81559, 80000, 1559, "nvml", name="NVIDIA H100"))
    events.sync(restarts=2, reconnects=3, comfyui_version="0.11.0")
    events.sync(restarts=2, reconnects=4, comfyui_version="0.11.0")  # only what is new counts
    got = samples(events.exposition().decode())
    assert events.counts == {"completed": 1, "failed": 1, "cancelled": 0, "requeued": 1}
    assert got[("comfyume_worker_jobs_total", (("outcome", "completed"),))] == 1
    assert got[("comfyume_worker_jobs_total", (("outcome", "cancelled"),))] == 0
    assert got[("comfyume_worker_claims_total", ())] == 1
    assert got[("comfyume_worker_requeues_total", (("reason", "vram"),))] == 1
    assert got[("comfyume_worker_admission_refusals_total", (("reason", "vram_short"),))] == 1
    assert got[("comfyume_worker_queue_wait_seconds_count", ())] == 1
    assert got[("comfyume_worker_run_seconds_count", (("outcome", "completed"),))] == 1
    assert got[("comfyume_worker_state", (("state", "idle"),))] == 1
    assert got[("comfyume_worker_state", (("state", "running"),))] == 0
    gpu = (("Hostname", "gpu-host-1"), ("gpu", "0"), ("modelName", "NVIDIA H100"))
    assert got[("comfyume_worker_DEV_FB_FREE", gpu)] == 80000
    assert got[("comfyume_worker_DEV_FB_USED", gpu)] == 1559
    assert got[("comfyume_worker_comfyui_restarts_total", ())] == 2
    assert got[("comfyume_worker_websocket_reconnects_total", ())] == 4
    info = (("comfyui_version", "0.11.0"), ("worker_id", "w1"), ("worker_version", "0.12.0"))
    assert got[("comfyume_worker_build_info", info)] == 1


@pytest.mark.integration
def test_a_worker_serves_its_metrics_and_they_match_its_status(
    r, comfyui, worker_env, start_worker
):
    port = free_port()
    worker_env.update(METRICS_PORT=str(port), METRICS_ADDRESS="127.0.0.1")
    worker = start_worker(worker_env)
    ids = [submit(r, image_workflow()) for _ in range(3)]
    assert all(wait_job(r, i)["status"] == "completed" for i in ids)
    status_key = f"worker:{worker_env['WORKER_ID']}:status"
    wait_for(lambda: json.loads(r.get(status_key))["jobs_completed"] == 3, 10, "status")

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            return samples(resp.read().decode())

    got = scrape()
    assert got[("comfyume_worker_jobs_total", (("outcome", "completed"),))] == 3
    assert got[("comfyume_worker_claims_total", ())] == 3
    assert got[("comfyume_worker_run_seconds_count", (("outcome", "completed"),))] == 3
    wait_for(lambda: scrape()[("comfyume_worker_state", (("state", "idle"),))] == 1, 10, "idle")
    assert any(
        name == "comfyume_worker_build_info" and dict(labels)["comfyui_version"] != "unknown"
        for name, labels in got
    )
    assert worker.log().count("serving Prometheus metrics") == 1
