"""The worker role's last check (tasks/queue.yml) says when the workers cannot reach their
queue: a WARNING naming the workers and the address, or a failure with worker_require_queue;
check mode only warns. Run here through ansible-playbook on localhost, with a `docker` stand-in
on PATH whose `docker exec <worker> ... healthcheck.py` runs the real comfyui-worker/healthcheck.py
against that worker's health file, written by the test as the worker writes it, and a local
HTTP server standing in for ComfyUI's /system_stats. The deployed path (a real Redis stopped
under real workers) is molecule/default/tests/test_queue_unreachable.py."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from localplay import REPO, run_local_playbook

HEALTHCHECK = REPO / "comfyui-worker" / "healthcheck.py"

FAKE_DOCKER = """#!/bin/bash
# docker exec <worker> <python> <healthcheck.py>: the health check against <worker>'s file.
[ "$1" = exec ] || exit 2
health="$FAKE_WORKERS/$2.health"
if [ ! -e "$health" ]; then
  echo "Error response from daemon: container $2 is not running"
  exit 1
fi
HEALTH_FILE="$health" exec PYTHON HEALTHCHECK
"""


class _SystemStats(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/system_stats" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def comfyui_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SystemStats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Host:
    """Two workers' health files, the docker stand-in, and the role's queue check."""

    def __init__(self, workdir: Path, comfyui_url: str) -> None:
        self.workdir = workdir
        self.workers = workdir / "workers"
        self.workers.mkdir()
        bin_dir = workdir / "bin"
        bin_dir.mkdir()
        docker = bin_dir / "docker"
        docker.write_text(
            FAKE_DOCKER.replace("PYTHON", sys.executable).replace("HEALTHCHECK", str(HEALTHCHECK))
        )
        docker.chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_WORKERS": str(self.workers),
            "COMFYUI_URL": comfyui_url,
        }

    def state(self, worker: str, state: str) -> None:
        """What the worker's health loop writes (worker.py, _health_loop)."""
        doc = {"ts": time.time(), "state": state, "out_of_service": None, "pid": 7}
        (self.workers / f"{worker}.health").write_text(json.dumps(doc))

    def check(self, *args: str, **variables: object) -> tuple[int, str, int]:
        """Run the queue check; the output with line breaks undone, and changed=."""
        play = {
            "name": "Run the worker role's queue check",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Check that the workers reach their queue",
                    "ansible.builtin.include_role": {"name": "worker", "tasks_from": "queue"},
                }
            ],
        }
        extra = {
            "worker_instances": 2,
            "worker_redis_host": "10.9.8.7",
            "worker_redis_port": 6390,
            "worker_queue_settle_seconds": 6,
            **variables,
        }
        proc = run_local_playbook(
            self.workdir, [play], extra, *args, env=self.env, secret_vars_file=False
        )
        return proc.returncode, proc.flat, proc.changed


@pytest.fixture
def host(tmp_path, comfyui_url) -> Host:
    return Host(tmp_path, comfyui_url)


UNREACHABLE = (
    "worker-2 cannot reach its queue, Redis at 10.9.8.7:6390"
    ' (worker-2: "healthy; queue unreachable").'
)


def test_a_worker_without_its_queue_is_a_warning_naming_the_address(host):
    host.state("worker-1", "idle")
    host.state("worker-2", "queue_unreachable")
    rc, out, changed = host.check()
    assert rc == 0, out
    assert f"WARNING: {UNREACHABLE}" in out
    assert "worker_require_queue: true makes this stop the play" in out
    assert changed == 0


def test_worker_require_queue_stops_the_play(host):
    host.state("worker-1", "idle")
    host.state("worker-2", "queue_unreachable")
    rc, out, _ = host.check(worker_require_queue=True)
    assert rc != 0, out
    assert UNREACHABLE in out
    assert "check that Redis runs on the app server and that this host reaches 10.9.8.7:6390" in out
    assert "worker_require_queue is true, so the play stops here" in out


def test_check_mode_only_warns(host):
    host.state("worker-1", "idle")
    host.state("worker-2", "queue_unreachable")
    rc, out, changed = host.check("--check", worker_require_queue=True)
    assert rc == 0, out
    assert f"WARNING: {UNREACHABLE}" in out
    assert changed == 0


def test_workers_that_reach_their_queue_say_nothing(host):
    host.state("worker-1", "idle")
    host.state("worker-2", "running")
    rc, out, changed = host.check(worker_require_queue=True)
    assert rc == 0, out
    assert "cannot reach" not in out
    assert changed == 0


def test_a_worker_starting_is_read_again_until_it_settles(host):
    """Starting is the worker putting back its own jobs, which waits on the queue: a worker
    that leaves it within worker_queue_settle_seconds is fine; one that stays is reported."""
    host.state("worker-1", "starting")
    host.state("worker-2", "starting")
    later = threading.Timer(2, host.state, ("worker-1", "idle"))
    later.start()
    try:
        rc, out, _ = host.check(
            worker_queue_source="http", worker_queue_manager_url="http://qm:8000"
        )
    finally:
        later.cancel()
    assert rc == 0, out
    assert (
        "WARNING: worker-2 cannot reach its queue, the queue-manager at http://qm:8000"
        ' (worker-2: "healthy; starting" still after 6 s, retrying the queue).'
    ) in out
    assert "worker-1:" not in out.split("WARNING:", 1)[1]


def test_an_ipv6_address_is_bracketed_and_every_worker_named(host):
    host.state("worker-1", "queue_unreachable")
    host.state("worker-2", "queue_unreachable")
    rc, out, _ = host.check(worker_redis_host="fd7a:115c:a1e0::1")
    assert rc == 0, out
    assert "worker-1, worker-2 cannot reach their queue, Redis at [fd7a:115c:a1e0::1]:6390" in out
