"""Fixtures for the worker's tests; the helpers they use live in worker_testlib.py.

`redis_server` starts Debian's redis-server with a password on a free loopback port (the password
reaches it on stdin, never on a command line). `comfyui` starts the ComfyUI stand-in
(tests/comfyui_standin/main.py) exactly as ComfyUI is started, or real ComfyUI v0.11.0 for tests
parametrised with comfyui_kind=COMFYUI_KINDS when COMFYUI_SOURCE names a checkout with a venv at
$COMFYUI_SOURCE/.venv (or COMFYUI_PYTHON); those runs are skipped cleanly otherwise.
Helpers are imported from worker_testlib, not from conftest: another conftest.py lives in
tests/contract, and test modules importing "conftest" could get that one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from worker_testlib import (
    ComfyServer,
    RedisServer,
    WorkerProcess,
    comfy_server,
    start_redis,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: builds and runs the worker image (needs docker)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One password-protected redis-server for the session; tests flush it through `r`."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    """A client on an empty database."""
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture(scope="session")
def _comfy_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ComfyServer]]:
    servers: dict[str, ComfyServer] = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def comfyui_kind() -> str:
    """Overridden by parametrize(comfyui_kind=COMFYUI_KINDS) in tests that also run on real."""
    return "standin"


@pytest.fixture
def comfyui(
    comfyui_kind: str,
    _comfy_servers: dict[str, ComfyServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> ComfyServer:
    """A shared ComfyUI of the requested kind, started once per session (restarted if dead)."""
    server = _comfy_servers.get(comfyui_kind)
    if server is None or server.process is None or server.process.poll() is not None:
        server = comfy_server(comfyui_kind, tmp_path_factory.mktemp(f"comfy-{comfyui_kind}"))
        server.start()
        _comfy_servers[comfyui_kind] = server
    server.reset()  # nothing left queued or running by an earlier test
    return server


@pytest.fixture
def worker_env(redis_server: RedisServer, comfyui: ComfyServer, tmp_path: Path) -> dict[str, str]:
    """Environment of a worker wired to the test redis-server and ComfyUI, with short timers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "COMFYUI_"))}
    env.update(redis_server.env())
    env.update(
        {
            "WORKER_ID": f"w-{uuid.uuid4().hex[:8]}",
            "COMFYUI_URL": comfyui.url,
            "OUTPUTS_DIR": str(comfyui.outputs_root),
            "COMFYUI_OUTPUT_DIR": str(comfyui.output_dir),
            "OUTPUT_DELIVERY": "local",
            "INPUTS_DIR": str(comfyui.base_dir / "participants"),
            "COMFYUI_INPUT_DIR": str(comfyui.base_dir / "inputs"),
            "STAGING_DIR": str(tmp_path / "staging"),
            "HEALTH_FILE": str(tmp_path / "health.json"),
            "HEALTH_INTERVAL": "0.2",
            "HEARTBEAT_INTERVAL": "0.5",
            "HEARTBEAT_TTL": "5",
            "QUEUE_POLL_INTERVAL": "1",
            "COMFYUI_POLL_INTERVAL": "0.5",
            "CANCEL_CHECK_INTERVAL": "0.2",
            "COMFYUI_TIMEOUT": "30",
            "WORKER_JOB_TIMEOUT": "30",
            "WORKER_INTERRUPT_GRACE": "2",
            "WORKER_SHUTDOWN_GRACE": "10",
            "BACKOFF_MAX": "1",
            "VRAM_FREE_WAIT": "0.3",
            "VRAM_BACKOFF": "0.5",
            "VRAM_BACKOFF_MAX": "1",
            "PYTHONPATH": "",
        }
    )
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `python worker.py` with an environment; every worker is stopped at the end."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], name: str = "worker") -> WorkerProcess:
        proc = WorkerProcess(env, tmp_path / f"{name}-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


# The app server's file exchange as the role renders it (tests/exchange/exchange_helpers.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "exchange"))
import exchange_helpers  # noqa: E402


@dataclass
class RunningExchange:
    """The role's nginx on loopback, with the test's view of the app server's data folders."""

    server: exchange_helpers.Exchange

    @property
    def url(self) -> str:
        return f"http://{self.server.address}:{self.server.port}"

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def inputs(self) -> Path:
        return self.server.inputs

    @property
    def outputs(self) -> Path:
        return self.server.outputs

    @property
    def access_log(self) -> Path:
        return self.server.logs / "access.log"

    def start(self) -> None:
        exchange_helpers.start(self.server)

    def stop(self) -> None:
        exchange_helpers.stop(self.server)


@pytest.fixture(scope="session")
def _exchange_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningExchange]:
    if not exchange_helpers.NGINX:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    token = secrets.token_urlsafe(24)
    server = exchange_helpers.prepare(
        tmp_path_factory.mktemp("exchange"), "127.0.0.1", token, 1 << 30
    )
    running = RunningExchange(server)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def exchange(_exchange_server: RunningExchange) -> Iterator[RunningExchange]:
    """The app server's exchange, running, with empty inputs and outputs folders."""
    for folder in (_exchange_server.inputs, _exchange_server.outputs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (_exchange_server.inputs / "shared").mkdir()
    yield _exchange_server
    if (
        _exchange_server.server.process is None
        or _exchange_server.server.process.poll() is not None
    ):
        _exchange_server.start()
