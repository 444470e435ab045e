"""Starts ComfyUI servers for the contract tests: the stand-in always, the real one when present.

The real ComfyUI runs when COMFYUI_SOURCE names a checkout of v0.11.0 (scripts/
setup-real-comfyui.sh makes one) whose Python is $COMFYUI_SOURCE/.venv/bin/python or
$COMFYUI_PYTHON; otherwise its tests are skipped. COMFYUI_STANDIN_PYTHON picks the interpreter
that runs the stand-in (default: the one running pytest). Every server gets a free loopback port
and its own temporary base directory, and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

# Shared with the worker's tests (tests/ is on sys.path through its conftest).
from worker_testlib import free_port, real_comfyui

HERE = Path(__file__).resolve().parent
STANDIN_MAIN = HERE.parent / "comfyui_standin" / "main.py"
REAL_TEST_NODES = HERE / "real_comfyui_nodes" / "standin_test_nodes.py"
PRESENT_CHECKPOINT = "present.safetensors"


@dataclass
class ComfyServer:
    """A running ComfyUI (real or stand-in) and where it keeps its files."""

    kind: str  # "standin" or "real"
    port: int
    base_dir: Path
    process: subprocess.Popen
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    kind: str,
    base_dir: Path,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    cpu: bool = True,
) -> ComfyServer:
    base_dir.mkdir(parents=True, exist_ok=True)
    models = base_dir / "shared-models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / PRESENT_CHECKPOINT).write_bytes(b"\0" * 1024)
    config = base_dir / "extra_model_paths.yaml"
    config.write_text(f"comfyume:\n    base_path: {models}\n    checkpoints: checkpoints/\n")
    port = free_port()
    args = [
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--output-directory",
        str(base_dir / "output"),
        "--input-directory",
        str(base_dir / "input"),
        "--extra-model-paths-config",
        str(config),
        *(["--cpu"] if cpu else []),
        *(extra_args or []),
    ]
    (base_dir / "custom_nodes").mkdir(exist_ok=True)  # ComfyUI exits at start without it
    if kind == "real":
        found = real_comfyui()
        assert found is not None
        source, python = found
        shutil.copy(REAL_TEST_NODES, base_dir / "custom_nodes" / REAL_TEST_NODES.name)
        cmd = [python, str(source / "main.py"), *args, "--disable-auto-launch"]
        cwd = source
        startup_timeout = 180.0
    else:
        python = os.environ.get("COMFYUI_STANDIN_PYTHON") or sys.executable
        cmd = [python, str(STANDIN_MAIN), *args]
        cwd = STANDIN_MAIN.parent
        startup_timeout = 30.0 + float((env or {}).get("COMFYUI_STANDIN_STARTUP_DELAY", "0"))
    log_path = base_dir / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    server = ComfyServer(kind, port, base_dir, process, log_path, extra_args or [])
    try:
        wait_until_up(server, startup_timeout)
    except Exception:
        server.stop()
        raise
    return server


def wait_until_up(server: ComfyServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.kind} ComfyUI exited at start:\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"{server.kind} ComfyUI did not listen within {timeout} s:\n{server.log_tail()}"
    )


SERVER_KINDS = [
    pytest.param("standin", id="standin"),
    pytest.param("real", id="real", marks=pytest.mark.comfyui_real),
]


@pytest.fixture(scope="session", params=SERVER_KINDS)
def comfy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server shared by the tests that hold for the real one and the stand-in alike."""
    if request.param == "real" and real_comfyui() is None:
        pytest.skip("real ComfyUI not set up: set COMFYUI_SOURCE (scripts/setup-real-comfyui.sh)")
    server = start_server(request.param, tmp_path_factory.mktemp(f"comfy-{request.param}"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start_comfy() -> Callable[..., ComfyServer]:
    """start_server(kind, base_dir, ...); skips the test when kind is "real" and none is set up."""

    def start(kind: str, base_dir: Path, *args: Any, **kwargs: Any) -> ComfyServer:
        if kind == "real" and real_comfyui() is None:
            pytest.skip(
                "real ComfyUI not set up: set COMFYUI_SOURCE (scripts/setup-real-comfyui.sh)"
            )
        return start_server(kind, base_dir, *args, **kwargs)

    return start


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A shared stand-in for tests of its test-only behaviour."""
    server = start_server("standin", tmp_path_factory.mktemp("standin"))
    yield server
    server.stop()


@pytest.fixture
def standin_factory(tmp_path: Path) -> Iterator[Callable[..., ComfyServer]]:
    """Starts private stand-ins (for tests that wedge or reconfigure one); stops them after."""
    started: list[ComfyServer] = []

    def make(
        extra_args: list[str] | None = None, env: dict[str, str] | None = None, cpu: bool = True
    ) -> ComfyServer:
        server = start_server("standin", tmp_path / f"s{len(started)}", extra_args, env, cpu)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------------------
# A client that drives the API the way the worker does
# ------------------------------------------------------------------------------------------


@dataclass
class PromptRun:
    status: int  # HTTP status of POST /prompt
    response: dict[str, Any]
    client_id: str
    messages: list[tuple[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)  # read as soon as "executing null" came

    @property
    def prompt_id(self) -> str:
        return self.response["prompt_id"]

    def types(self, skip: tuple[str, ...] = ("status", "progress_state")) -> list[str]:
        return [t for t, _ in self.messages if t not in skip]

    def of_type(self, kind: str) -> list[Any]:
        return [d for t, d in self.messages if t == kind]


OnMessage = Callable[[aiohttp.ClientSession, str, Any, str], Awaitable[None]]


async def run_prompt(
    server: ComfyServer,
    prompt: dict[str, Any],
    *,
    client_id: str | None = None,
    prompt_id: str | None = None,
    extra_data: dict[str, Any] | None = None,
    on_message: OnMessage | None = None,
    timeout: float = 30.0,
) -> PromptRun:
    """Connects the websocket, posts the prompt, collects events until it ends, reads history."""
    client_id = client_id or uuid.uuid4().hex
    body: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
    if prompt_id:
        body["prompt_id"] = prompt_id
    if extra_data is not None:
        body["extra_data"] = extra_data
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout + 10)) as session,
        session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws,
    ):
        async with session.post(f"{server.url}/prompt", json=body) as resp:
            run = PromptRun(resp.status, await resp.json(), client_id)
        if resp.status != 200:
            return run
        pid = run.prompt_id
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"prompt {pid} did not finish; got {run.types()}")
            msg = await ws.receive(timeout=remaining)
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"websocket ended ({msg.type}); got {run.types()}")
            event = json.loads(msg.data)
            run.messages.append((event["type"], event["data"]))
            if on_message is not None:
                await on_message(session, event["type"], event["data"], pid)
            data = event["data"]
            if (
                event["type"] == "executing"
                and data.get("node") is None
                and data.get("prompt_id") == pid
            ):
                break
        async with session.get(f"{server.url}/history/{pid}") as resp:
            run.history = (await resp.json()).get(pid, {})
    return run


async def request(
    server: ComfyServer, method: str, path: str, payload: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, server.url + path, json=payload) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw


def call(server: ComfyServer, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    return asyncio.run(request(server, method, path, payload))


@pytest.fixture
def api():
    """Helpers for tests: api.run(server, prompt, ...), api.call(server, method, path, json)."""

    class Api:
        @staticmethod
        def run(server: ComfyServer, prompt: dict[str, Any], **kwargs: Any) -> PromptRun:
            return asyncio.run(run_prompt(server, prompt, **kwargs))

        call = staticmethod(call)
        arun = staticmethod(run_prompt)
        arequest = staticmethod(request)

    return Api
