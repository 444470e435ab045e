"""Day-two playbooks against the deployed workers: verify.yml reports health, a rolling
restart loses no job, teardown.yml keeps every byte of data. The teardown test brings the
workers back with site.yml, so the other test files find them running."""

from __future__ import annotations

import json
import time

import submit_job
from conftest import REPO, inspect, run_playbook

REPORT = REPO / ".artifacts" / "verify-report.json"


def sleep_workflow(seconds: int) -> dict:
    """EmptyImage -> StandInSleep (a test-only node of the stand-in) -> SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "3": {
            "class_type": "StandInSleep",
            "inputs": {"images": ["1", 0], "seconds": seconds, "steps": seconds},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 0], "filename_prefix": f"drain{time.time_ns()}"},
        },
    }


def test_verify_reports_healthy_workers():
    run = run_playbook(REPO / "playbooks/verify.yml", "-e", f"verify_report_path={REPORT}")
    assert run.rc == 0, run.output[-3000:]
    report = json.loads(REPORT.read_text())["verda-sim"]
    assert report["ok"] is True, report
    assert [w["name"] for w in report["workers"]] == ["worker-1", "worker-2"]
    assert all(w["health"] == "healthy" and w["redis"] for w in report["workers"])
    assert report["scratch_free_mb"] > 0


def listening(host, port: int) -> bool:
    return host.check_output(f"ss -Htln 'sport = :{port}'") != ""


def test_verify_names_a_listener_on_a_public_address(gpu_host):
    """A server on 0.0.0.0 fails verify, named with its process and address; one on loopback
    does not."""
    servers = {
        "comfyume-test-public": ("0.0.0.0", 18090),
        "comfyume-test-loopback": ("127.0.0.1", 18091),
    }
    try:
        for unit, (address, port) in servers.items():
            server = f"python3 -m http.server {port} --bind {address}"
            gpu_host.check_output(f"systemd-run --collect --unit {unit} {server}")
        deadline = time.monotonic() + 30
        while not all(listening(gpu_host, port) for _, port in servers.values()):
            assert time.monotonic() < deadline, "the test servers did not start"
            time.sleep(0.5)
        run = run_playbook(REPO / "playbooks/verify.yml", "-e", f"verify_report_path={REPORT}")
    finally:
        for unit in servers:
            gpu_host.run(f"systemctl stop {unit}")
    assert run.rc != 0, run.output[-3000:]
    report = json.loads(REPORT.read_text())["verda-sim"]
    [public] = report["public_listeners"]
    assert public.startswith("python3 (pid ") and public.endswith(") on 0.0.0.0:18090/tcp"), public
    assert report["failures"] == [f"listening on a public address: {public}"]
    assert f"listening on a public address: {public}" in run.flat
    assert ":18091" not in run.output


def test_rolling_restart_loses_no_job(gpu_host, redis_client):
    ids_before = {n: inspect(gpu_host, n)["State"]["StartedAt"] for n in ("worker-1", "worker-2")}
    jobs = [submit_job.enqueue(redis_client, sleep_workflow(4), "drain-user") for _ in range(3)]
    # Wait until the workers hold jobs, so the restart has something to drain.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and redis_client.zcard("queue:running") == 0:
        time.sleep(0.2)
    run = run_playbook(REPO / "playbooks/rolling-restart.yml")
    assert run.rc == 0, run.output[-3000:]
    docs = [submit_job.wait(redis_client, job_id, timeout=120) for job_id in jobs]
    assert [d["status"] for d in docs] == ["completed"] * 3, docs
    for name, started in ids_before.items():
        info = inspect(gpu_host, name)
        assert info["State"]["StartedAt"] != started, f"{name} was not restarted"
        assert info["State"]["Health"]["Status"] == "healthy"


def test_teardown_stops_the_workers_and_keeps_the_data(gpu_host):
    outputs_before = gpu_host.check_output(
        "find /mnt/scratch/outputs -type f | sort | xargs sha256sum"
    )
    assert outputs_before
    run = run_playbook(REPO / "playbooks/teardown.yml")
    assert run.rc == 0, run.output[-3000:]
    assert gpu_host.check_output("docker ps --all --quiet --filter name=worker-") == ""
    assert (
        gpu_host.check_output("find /mnt/scratch/outputs -type f | sort | xargs sha256sum")
        == outputs_before
    )
    assert gpu_host.mount_point("/mnt/scratch").exists
    assert gpu_host.file("/home/dev/comfyume/.env").exists
    # With no workers, verify.yml fails and says why.
    run = run_playbook(REPO / "playbooks/verify.yml", "-e", f"verify_report_path={REPORT}")
    assert run.rc != 0
    assert "no worker containers" in run.output
    # The play brings them back.
    run = run_playbook(REPO / "site.yml", "--tags", "worker")
    assert run.rc == 0, run.output[-3000:]
    for name in ("worker-1", "worker-2"):
        assert inspect(gpu_host, name)["State"]["Health"]["Status"] == "healthy"
