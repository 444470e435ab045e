"""Helpers for the worker's tests: a real redis-server, a ComfyUI (stand-in or real), workers.

`redis_server` starts Debian's redis-server with a password on a free loopback port; the
password reaches it on stdin, never on a command line. `comfyui` starts the ComfyUI stand-in
(tests/comfyui_standin/main.py) exactly as ComfyUI is started, and, for tests parametrised with
`comfyui_kind`, real ComfyUI v0.11.0 when COMFYUI_SOURCE names a checkout with a venv at
$COMFYUI_SOURCE/.venv (or COMFYUI_PYTHON); those runs are skipped cleanly otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis

HERE = Path(__file__).resolve().parent
WORKER_DIR = HERE.parent
STANDIN_MAIN = HERE / "comfyui_standin" / "main.py"
REAL_TEST_NODES = HERE / "contract" / "real_comfyui_nodes" / "standin_test_nodes.py"
FAKES = HERE / "fakes"
PYTHON = sys.executable
# The worker is a set of flat modules run as a script; tests import them from its folder.
if str(WORKER_DIR) not in sys.path:
    sys.path.insert(0, str(WORKER_DIR))

from jobs import new_job_record  # noqa: E402  (the worker's folder is on sys.path now)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str], step: float = 0.02
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        time.sleep(step)


# -- Redis ------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    host: str
    port: int
    password: str
    process: subprocess.Popen | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password)

    def env(self) -> dict[str, str]:
        return {
            "REDIS_HOST": self.host,
            "REDIS_PORT": str(self.port),
            "REDIS_PASSWORD": self.password,
        }

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(port: int | None = None, password: str | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer("127.0.0.1", port or free_port(), password or secrets.token_hex(16))
    conf = (
        f"port {server.port}\nbind 127.0.0.1\nrequirepass {server.password}\n"
        'save ""\nappendonly no\nprotected-mode yes\n'
    )
    proc = subprocess.Popen(
        [binary, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(conf.encode())
    proc.stdin.close()
    server.process = proc
    client = server.client()

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_for(up, 15, "redis-server to answer")
    return server


# -- ComfyUI ----------------------------------------------------------------------------------


def real_comfyui() -> tuple[Path, str] | None:
    source = os.environ.get("COMFYUI_SOURCE")
    if not source or not (Path(source) / "main.py").is_file():
        return None
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(source) / ".venv" / "bin" / "python")
    if not os.access(python, os.X_OK):
        return None
    return Path(source), python


@dataclass
class ComfyServer:
    """A running ComfyUI (real or stand-in) and its folders."""

    kind: str
    port: int
    base_dir: Path
    command: list[str]
    cwd: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "outputs" / ".comfyui"

    @property
    def outputs_root(self) -> Path:
        return self.base_dir / "outputs"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    def start(self, wait: bool = True) -> ComfyServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        if wait:
            self.wait_up(180 if self.kind == "real" else 30)
        return self

    def wait_up(self, timeout: float) -> None:
        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.kind} ComfyUI exited:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return True
            return False

        wait_for(up, timeout, f"{self.kind} ComfyUI to listen", step=0.05)

    def reset(self, timeout: float = 10) -> None:
        """Clear ComfyUI's queue and interrupt what runs, then wait until it is idle."""

        def post(path: str, body: dict[str, Any]) -> None:
            req = urllib.request.Request(
                self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            urllib.request.urlopen(req, timeout=5).close()

        def idle() -> bool:
            with urllib.request.urlopen(self.url + "/queue", timeout=5) as resp:
                queue = json.load(resp)
            if queue["queue_running"] or queue["queue_pending"]:
                post("/interrupt", {})
                return False
            return True

        post("/queue", {"clear": True})
        wait_for(idle, timeout, f"{self.kind} ComfyUI to be idle", step=0.1)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def comfy_server(kind: str, base_dir: Path, port: int | None = None) -> ComfyServer:
    """A ComfyUI laid out like the container: outputs/.comfyui inside the outputs volume."""
    base_dir.mkdir(parents=True, exist_ok=True)
    models = base_dir / "models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / "present.safetensors").write_bytes(b"\0" * 1024)
    extra = base_dir / "extra_model_paths.yaml"
    extra.write_text(f"comfyume:\n    base_path: {models}\n    checkpoints: checkpoints/\n")
    port = port or free_port()
    args = [
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--output-directory",
        str(base_dir / "outputs" / ".comfyui"),
        "--input-directory",
        str(base_dir / "inputs"),
        "--extra-model-paths-config",
        str(extra),
        "--cpu",
    ]
    if kind == "real":
        found = real_comfyui()
        if found is None:
            pytest.skip("real ComfyUI not available (set COMFYUI_SOURCE to a v0.11.0 checkout)")
        source, python = found
        (base_dir / "custom_nodes").mkdir(exist_ok=True)
        shutil.copy(REAL_TEST_NODES, base_dir / "custom_nodes" / REAL_TEST_NODES.name)
        command = [python, str(source / "main.py"), *args, "--base-directory", str(base_dir)]
        command.append("--disable-auto-launch")
        return ComfyServer(kind, port, base_dir, command, source)
    if not STANDIN_MAIN.is_file():
        pytest.skip("the ComfyUI stand-in (tests/comfyui_standin/main.py) is not there yet")
    return ComfyServer(
        kind,
        port,
        base_dir,
        [PYTHON, str(STANDIN_MAIN), *args],
        STANDIN_MAIN.parent,
        env={"COMFYUI_STANDIN_PROMPT_LOG": str(base_dir / "prompts.jsonl")},
    )


def managed_comfyui(worker_env: dict[str, str], base_dir: Path) -> dict[str, str]:
    """worker_env for a worker that starts and supervises its own ComfyUI stand-in, as in the
    container (COMFYUI_START=true)."""
    server = comfy_server("standin", base_dir)
    worker_env.update(
        COMFYUI_START="true",
        COMFYUI_DIR=str(server.cwd),
        COMFYUI_PYTHON=server.command[0],
        COMFYUI_URL=server.url,
        COMFYUI_ARGS="--cpu",
        OUTPUTS_DIR=str(server.outputs_root),
        COMFYUI_OUTPUT_DIR=str(server.output_dir),
        COMFYUI_INPUT_DIR=str(server.base_dir / "inputs"),
    )
    return worker_env


def prompts_per_job(server: ComfyServer, job_ids: list[str]) -> dict[str, int]:
    """How many prompts the stand-in accepted for each job (its SaveImage prefixes carry the
    job id, as the worker tags them)."""
    counts = dict.fromkeys(job_ids, 0)
    path = server.base_dir / "prompts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        for prefix in json.loads(line)["filename_prefixes"]:
            job_id = prefix.split("/", 1)[0]
            if job_id in counts:
                counts[job_id] += 1
    return counts


COMFYUI_KINDS = [
    pytest.param("standin", id="standin"),
    pytest.param("real", id="real", marks=pytest.mark.comfyui_real),
]


# -- jobs -------------------------------------------------------------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real 8-bit RGB PNG of one colour, as a participant's upload would be."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def image_workflow(prefix: str = "ComfyUI", color: int = 0) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def node_workflow(class_type: str, **inputs: Any) -> dict[str, Any]:
    """EmptyImage -> <class_type>(**inputs) -> SaveImage."""
    wf = image_workflow()
    wf["3"] = {"class_type": class_type, "inputs": {"images": ["1", 0], **inputs}}
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf


def submit(
    client: redis.Redis,
    workflow: Any = None,
    user_id: Any = "alice",
    priority: int = 2,
    metadata: dict[str, Any] | None = None,
    created_at: datetime | None = None,
    job_id: str | None = None,
    raw: bytes | None = None,
    publish: bool = True,
) -> str:
    """Queue a job exactly as the queue-manager does (key, pending score, user set, event)."""
    job_id = job_id or str(uuid.uuid4())
    created = created_at or datetime.now(timezone.utc)
    doc = new_job_record(
        job_id,
        user_id,
        image_workflow() if workflow is None else workflow,
        priority,
        created.isoformat(),
        metadata,
    )
    client.set(f"job:{job_id}", raw if raw is not None else json.dumps(doc))
    client.zadd("queue:pending", {job_id: priority * 1_000_000 + created.timestamp()})
    if isinstance(user_id, str) and user_id:
        client.sadd(f"user:{user_id}:jobs", job_id)
    if publish:
        event = {"type": "job_created", "data": doc, "timestamp": created.isoformat()}
        client.publish("queue:updates", json.dumps(event))
    return job_id


def job(client: redis.Redis, job_id: str) -> dict[str, Any]:
    raw = client.get(f"job:{job_id}")
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"status": "(unparsable)"}


def wait_job(
    client: redis.Redis, job_id: str, statuses: tuple[str, ...] = ("completed", "failed"), t=20.0
) -> dict[str, Any]:
    return wait_for(
        lambda: (doc := job(client, job_id)).get("status") in statuses and doc,
        t,
        lambda: f"job {job_id} to reach {statuses} (now {job(client, job_id).get('status')})",
    )


# -- worker processes -------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, str(WORKER_DIR / "worker.py")],
                cwd=WORKER_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit in {timeout} s:\n{self.log()}") from None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def wait_log(self, text: str, timeout: float = 15) -> None:
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in the worker log")
