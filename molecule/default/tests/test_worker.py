"""The deployed workers: healthy, configured from group_vars, and completing a real job
pushed into the app server's queue, with its output delivered to the app server."""

from __future__ import annotations

import json

import pytest
import submit_job
from conftest import REPO, TIMEOUTS, inspect, run_playbook


@pytest.mark.parametrize("name", ["worker-1", "worker-2"])
def test_workers_are_healthy_with_their_own_ids(gpu_host, name):
    info = inspect(gpu_host, name)
    assert info["State"]["Health"]["Status"] == "healthy"
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])
    assert env["WORKER_ID"] == f"verda-sim-{name}"
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"


def test_worker_environment_carries_the_configured_timeouts(gpu_host):
    env = dict(item.split("=", 1) for item in inspect(gpu_host, "worker-1")["Config"]["Env"])
    assert env["COMFYUI_TIMEOUT"] == str(TIMEOUTS["comfyui_http"])
    assert env["WORKER_JOB_TIMEOUT"] == str(TIMEOUTS["job"])
    assert env["QUEUE_MANAGER_TIMEOUT"] == str(TIMEOUTS["queue_manager_http"])
    assert env["HEARTBEAT_TTL"] == str(TIMEOUTS["heartbeat_ttl"])
    assert env["HEARTBEAT_INTERVAL"] == str(TIMEOUTS["heartbeat_interval"])


def test_healthcheck_carries_the_configured_timings(gpu_host):
    check = inspect(gpu_host, "worker-1")["Config"]["Healthcheck"]
    seconds = 1_000_000_000
    assert check["Interval"] == TIMEOUTS["healthcheck_interval"] * seconds
    assert check["Timeout"] == TIMEOUTS["healthcheck_timeout"] * seconds
    assert check["StartPeriod"] == TIMEOUTS["healthcheck_start_period"] * seconds
    assert check["Retries"] == TIMEOUTS["healthcheck_retries"]


def test_project_env_is_private_to_dev(gpu_host):
    env = gpu_host.file("/home/dev/comfyume/.env")
    assert env.user == "dev"
    assert env.mode == 0o600


def test_redis_answers_from_inside_worker_1(gpu_host):
    """As root (docker exec's user), which alone reads the password's file, through the
    worker's own configuration reader (REDIS_PASSWORD_FILE)."""
    out = gpu_host.check_output(
        "docker exec worker-1 /opt/worker-venv/bin/python -c "
        "\"import sys; sys.path.insert(0, '/app'); import redis; from config import Config; "
        "cfg = Config.from_env(); print(redis.Redis(cfg.redis_host, cfg.redis_port, "
        'password=cfg.redis_password).ping())"'
    )
    assert out == "True"


def test_a_queued_job_completes_with_its_output_on_the_app_server(gpu_host, app_host, redis_client):
    workflow = json.loads((REPO / "data/workflows/empty-image.json").read_text())
    job_id = submit_job.enqueue(redis_client, workflow, "molecule-user")
    doc = submit_job.wait(redis_client, job_id, timeout=120)
    assert doc["status"] == "completed", doc
    assert doc["worker_id"] in ("verda-sim-worker-1", "verda-sim-worker-2")
    [output] = doc["result"]["outputs"]
    assert output["path"] == f"molecule-user/{job_id}/{output['filename']}"
    png = app_host.file(f"/home/dev/comfyume/data/outputs/{output['path']}")
    assert png.exists
    assert png.size == output["size"]
    assert png.sha256sum == output["sha256"]
    assert redis_client.zscore("queue:completed", job_id) is not None
    # Delivered, so nothing of it stays on the GPU host.
    left = gpu_host.run(f"find /mnt/scratch -path '*{job_id}*'").stdout.strip()
    assert left == ""


def test_second_converge_leaves_the_workers_untouched(gpu_host):
    before = {n: inspect(gpu_host, n)["Id"] for n in ("worker-1", "worker-2")}
    run = run_playbook(REPO / "site.yml", "--tags", "worker")
    assert run.rc == 0, run.output[-3000:]
    after = {n: inspect(gpu_host, n)["Id"] for n in ("worker-1", "worker-2")}
    assert after == before


def test_images_of_earlier_build_contexts_are_removed_once_workers_are_healthy(gpu_host):
    """Each build context gets its own tag; the ones the workers no longer run go."""
    image = inspect(gpu_host, "worker-1")["Config"]["Image"]
    name, current = image.split(":")
    for old in ("0000000000000001", "0000000000000002"):
        gpu_host.check_output(f"docker tag {image} {name}:{old}")
    run = run_playbook(REPO / "site.yml", "--tags", "worker", "-e", "worker_keep_old_images=1")
    assert run.rc == 0, run.output[-3000:]
    tags = gpu_host.check_output(f"docker image ls --format '{{{{.Tag}}}}' {name}").split()
    assert current in tags and len(tags) == 2, tags
    run = run_playbook(REPO / "site.yml", "--tags", "worker", "-e", "worker_keep_old_images=0")
    assert run.rc == 0, run.output[-3000:]
    assert gpu_host.check_output(f"docker image ls --format '{{{{.Tag}}}}' {name}").split() == [
        current
    ]
    assert inspect(gpu_host, "worker-1")["State"]["Health"]["Status"] == "healthy"


def test_manual_compose_start_uses_the_plays_configuration(gpu_host):
    """The old manual start keeps working and matches the play: nothing is recreated."""
    before = inspect(gpu_host, "worker-1")["Id"]
    out = gpu_host.run("cd /home/dev/comfyume/comfyui-worker && sudo docker compose up -d worker-1")
    assert out.rc == 0, out.stderr
    assert inspect(gpu_host, "worker-1")["Id"] == before
