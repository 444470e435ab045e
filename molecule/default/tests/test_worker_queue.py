"""With the app server's Redis stopped, the workers stay up and say "healthy; queue
unreachable", and the worker play warns naming Redis's address (or stops with
worker_require_queue), for a worker that was running and for one started while Redis is away.
Runs last (by name): Redis is started again and the workers are idle before it returns."""

from __future__ import annotations

import time

from conftest import REPO, inspect, recap, run_playbook

WORKERS = ("worker-1", "worker-2")
HEALTHCHECK = "/opt/worker-venv/bin/python /app/healthcheck.py"


def health(host, name: str) -> str:
    return host.run(f"docker exec {name} {HEALTHCHECK}").stdout.strip()


def wait_for_health(host, wanted: dict[str, str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = {name: health(host, name) for name in wanted}
        if seen == wanted:
            return
        time.sleep(2)
    raise AssertionError(f"health {seen}, waited for {wanted}")


def test_an_unreachable_queue_is_reported_naming_its_address(gpu_host, app_host):
    env = dict(item.split("=", 1) for item in inspect(gpu_host, "worker-1")["Config"]["Env"])
    address = f"{env['REDIS_HOST']}:{env['REDIS_PORT']}"
    app_host.check_output("systemctl stop redis-server")
    try:
        # Each worker finds out at its next claim (QUEUE_POLL_INTERVAL, 5 s).
        wait_for_health(gpu_host, dict.fromkeys(WORKERS, "healthy; queue unreachable"))
        run = run_playbook(REPO / "site.yml", "--tags", "worker")
        out = run.flat
        assert run.rc == 0, run.output[-3000:]
        assert (
            f"WARNING: worker-1, worker-2 cannot reach their queue, Redis at {address}"
            ' (worker-1: "healthy; queue unreachable", worker-2: "healthy; queue unreachable").'
        ) in out
        assert recap(run.output)["verda-sim"]["changed"] == 0

        # A worker started while Redis is away says so as soon as its first call to the
        # queue (putting back its own jobs) fails; the play waits out the start, at most
        # the settle time, before it reads the health.
        gpu_host.check_output("docker restart worker-2")
        run = run_playbook(
            REPO / "site.yml",
            "--tags",
            "worker",
            "-e",
            '{"worker_require_queue": true, "worker_queue_settle_seconds": 10}',
        )
        out = run.flat
        assert run.rc != 0, run.output[-3000:]
        assert f"cannot reach their queue, Redis at {address}" in out
        assert 'worker-2: "healthy; queue unreachable"' in out
        assert "worker_require_queue is true, so the play stops here" in out
        assert all(inspect(gpu_host, n)["State"]["Running"] for n in WORKERS)
    finally:
        app_host.check_output("systemctl start redis-server")
    wait_for_health(gpu_host, dict.fromkeys(WORKERS, "healthy; idle"), timeout=120)
