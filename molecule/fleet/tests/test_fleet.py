"""The fleet after one converge of site.yml: one image build for the whole fleet, every
worker healthy, and a job completed on each host."""

from __future__ import annotations

import json

import pytest
import submit_job
from conftest import GPU_HOSTS, REPO, run_playbook
from simlib import inspect

WORKER_DIR = "/home/dev/comfyume/comfyui-worker"
CACHE = "/mnt/sfs/cache/images"
RECORD = "/var/lib/comfyume/worker-image.json"


def record(host) -> dict:
    return json.loads(host.file(RECORD).content_string)


def running_image(host) -> str:
    return inspect(host, "worker-1")["Config"]["Image"]


def test_the_fleet_shares_one_sfs_share(hosts):
    hosts["fleet-gpu-1"].check_output("touch /mnt/sfs/tmp/from-gpu-1")
    try:
        for host in hosts.values():
            assert host.mount_point("/mnt/sfs").exists
            assert host.file("/mnt/sfs/tmp/from-gpu-1").exists
    finally:
        hosts["fleet-gpu-1"].check_output("rm -f /mnt/sfs/tmp/from-gpu-1")


def test_exactly_one_host_built_the_image_and_the_others_loaded_it(hosts):
    records = {name: record(host) for name, host in hosts.items()}
    sources = sorted(r["source"] for r in records.values())
    assert sources == ["build", "cache", "cache"], records
    images = {running_image(host) for host in hosts.values()}
    assert len(images) == 1, images
    [image] = images
    ids = {
        host.check_output(f"docker image inspect -f '{{{{.Id}}}}' {image}")
        for host in hosts.values()
    }
    assert len(ids) == 1, f"the same tag must be the same image on every host: {ids}"
    for name, r in records.items():
        steps = [s["step"] for s in r["steps"]]
        if r["source"] == "cache":
            assert "build" not in steps and steps[-2:] == ["verify", "load"], (name, steps)
    builder = next(n for n, r in records.items() if r["source"] == "build")
    tarball = records[builder]["tarball"]
    assert all(r["tarball"] == tarball for r in records.values())
    assert not hosts[builder].run(f"ls -A {CACHE} | grep -E '\\.(lock|tmp)$'").stdout


def test_every_worker_is_healthy_with_its_hosts_id(hosts):
    for name, host in hosts.items():
        state = inspect(host, "worker-1")
        assert state["State"]["Health"]["Status"] == "healthy", name
        env = dict(item.split("=", 1) for item in state["Config"]["Env"])
        assert env["WORKER_ID"] == f"{name}-worker-1"


@pytest.mark.parametrize("target", GPU_HOSTS)
def test_a_job_queued_on_the_app_server_completes_on_each_host(hosts, redis_client, target):
    """Only the target's worker runs, so the job can only complete there."""
    others = [host for name, host in hosts.items() if name != target]
    for host in others:
        host.check_output(f"cd {WORKER_DIR} && docker compose stop")
    try:
        workflow = json.loads((REPO / "data/workflows/empty-image.json").read_text())
        job_id = submit_job.enqueue(redis_client, workflow, f"fleet-user-{target}")
        doc = submit_job.wait(redis_client, job_id, timeout=120)
        assert doc["status"] == "completed", doc
        assert doc["worker_id"] == f"{target}-worker-1"
    finally:
        for host in others:
            host.check_output(f"cd {WORKER_DIR} && docker compose start")


def test_a_truncated_tarball_is_refused_and_replaced_for_the_whole_fleet(hosts):
    """A host that needs the image finds the shared tarball corrupt: it rebuilds it, and the
    next host loads the replacement."""
    image = running_image(hosts["fleet-gpu-1"])
    tag = image.split(":", 1)[1]
    tarball = f"{CACHE}/comfyui-worker_{tag}.tar.zst"
    first, second = hosts["fleet-gpu-2"], hosts["fleet-gpu-3"]
    size = first.file(tarball).size
    first.check_output(f"truncate -s {size // 3} {tarball}")
    for host in (first, second):
        host.check_output(f"cd {WORKER_DIR} && docker compose down && docker image rm {image}")

    run = run_playbook(REPO / "playbooks" / "worker.yml", "-l", "fleet-gpu-2")
    assert run.rc == 0, run.output[-3000:]
    rebuilt = record(first)
    assert rebuilt["source"] == "build" and "does not match" in rebuilt["refused"][0], rebuilt
    assert "load" not in [s["step"] for s in rebuilt["steps"]]
    check = first.run(f"cd {CACHE} && sha256sum -c comfyui-worker_{tag}.tar.zst.sha256")
    assert check.rc == 0, check.stdout + check.stderr

    run = run_playbook(REPO / "playbooks" / "worker.yml", "-l", "fleet-gpu-3")
    assert run.rc == 0, run.output[-3000:]
    assert record(second)["source"] == "cache"
    for host in (first, second):
        assert inspect(host, "worker-1")["State"]["Health"]["Status"] == "healthy"
