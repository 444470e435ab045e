"""The workers the play deployed reach the app server's Redis with the settings the play gave
them, and the password is on no command line of either host.

These test the project, not the scenario's Redis: a wrong REDIS_HOST, port or password in the
rendered configuration, or a password passed on a command line, makes them fail.
"""

from __future__ import annotations

import json
import subprocess
import time

from conftest import GPU_HOST

PYTHON_STDIN = ("/opt/worker-venv/bin/python", "-")

# Run inside a deployed worker with the worker's own configuration reader, so the check sees
# exactly what worker.py sees (the password from the environment or its file).
PING_AS_THE_WORKER = r"""
import sys
sys.path.insert(0, "/app")
import redis
from config import Config
cfg = Config.from_env()
right = redis.Redis(cfg.redis_host, cfg.redis_port, db=cfg.redis_db, password=cfg.redis_password,
                    socket_timeout=5)
print("configured:", right.ping())
wrong = redis.Redis(cfg.redis_host, cfg.redis_port, password=cfg.redis_password + "-not",
                    socket_timeout=5)
try:
    wrong.ping()
    print("wrong password: accepted")
except redis.exceptions.AuthenticationError:
    print("wrong password: refused")
"""


def workers(gpu_host) -> list[str]:
    fmt = "'{{.Names}}'"
    label = "label=com.docker.compose.project=comfyui-worker"
    names = gpu_host.check_output(f"docker ps --filter {label} --format {fmt}").split()
    assert names, "no worker containers run"
    return sorted(names)


def worker_id(gpu_host, name: str) -> str:
    fmt = "'{{json .Config.Env}}'"
    env = json.loads(gpu_host.check_output(f"docker inspect --format {fmt} {name}"))
    return dict(item.split("=", 1) for item in env)["WORKER_ID"]


def test_each_deployed_worker_beats_in_the_app_servers_redis(gpu_host, redis_client):
    for name in workers(gpu_host):
        wid = worker_id(gpu_host, name)
        deadline = time.monotonic() + 60
        while (raw := redis_client.get(f"worker:{wid}:status")) is None:
            assert time.monotonic() < deadline, f"{name} ({wid}) never wrote its status to Redis"
            time.sleep(1)
        status = json.loads(raw)
        assert status["worker_id"] == wid and status["queue_source"] == "redis"
        assert status["state"] in ("idle", "running"), status
        assert redis_client.ttl(f"worker:{wid}:heartbeat") > 0


def test_a_deployed_worker_authenticates_with_its_configured_password(gpu_host):
    name = workers(gpu_host)[0]
    out = subprocess.run(
        ["docker", "exec", "-i", GPU_HOST, "docker", "exec", "-i", name, *PYTHON_STDIN],
        input=PING_AS_THE_WORKER,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["configured: True", "wrong password: refused"]


def test_the_password_is_on_no_command_line(gpu_host, app_host, redis_password):
    # The GPU host's process list includes its containers' processes (worker and ComfyUI).
    listing = gpu_host.check_output("ps -eo args")
    assert "worker.py" in listing
    assert redis_password not in listing
    assert redis_password not in app_host.check_output("ps -eo args")
