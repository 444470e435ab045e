"""ComfyUI as a child process of the worker (COMFYUI_START=true, as in the container).

The worker is the one process that knows when ComfyUI must be restarted: a prompt that ignores
an interrupt can only be ended by restarting ComfyUI. A ComfyUI that dies by itself is restarted
with capped backoff. ComfyUI runs in its own process group, with the worker's secrets removed
from its environment, and is stopped when the worker exits.

Outside a container (plain-process mode) a worker killed with SIGKILL cannot stop its ComfyUI,
so ComfyUI is started with a parent-death signal (Linux `PR_SET_PDEATHSIG`): the kernel kills it
when the worker dies. Its pid is also written beside the health file; at start, a ComfyUI that
an earlier run of this worker left on the port is stopped before a new one is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time

from config import Config
from logs import StateLog
from privileges import LIBC_PRCTL
from tasks import keep_running

log = logging.getLogger("comfyui_worker.supervisor")
SECRET_VARS = (
    "REDIS_PASSWORD",
    "REDIS_PASSWORD_FILE",
    "FILE_EXCHANGE_TOKEN",
    "FILE_EXCHANGE_TOKEN_FILE",
)


def comfyui_command(cfg: Config) -> list[str]:
    """The ComfyUI command line: its own flags for the SFS model layout and output folders."""
    host, port = cfg.comfyui_host_port
    argv = [cfg.comfyui_python, "main.py", "--listen", host, "--port", str(port)]
    argv += [
        "--output-directory",
        cfg.comfyui_output_dir or os.path.join(cfg.outputs_dir, ".comfyui"),
    ]
    argv += ["--input-directory", cfg.comfyui_inputs]
    if cfg.comfyui_extra_model_paths:
        argv += ["--extra-model-paths-config", cfg.comfyui_extra_model_paths]
    argv += list(cfg.comfyui_args)
    return argv


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Runs in the child between fork and exec: SIGKILL it when the worker dies."""
    if LIBC_PRCTL is not None:
        LIBC_PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the worker died before the signal was armed
        os._exit(1)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


class ComfyProcess:
    """Starts, watches, stops and restarts one ComfyUI process."""

    def __init__(self, cfg: Config, states: StateLog | None = None) -> None:
        self.cfg = cfg
        self.argv = comfyui_command(cfg)
        self.states = states or StateLog(log)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # One per port: two plain-process workers on one host never take each other's.
        self.pid_file = f"{cfg.health_file}.comfyui-{cfg.comfyui_host_port[1]}.pid"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def start(self) -> None:
        output_dir = self.argv[self.argv.index("--output-directory") + 1]
        for folder in (output_dir, self.cfg.comfyui_inputs):
            os.makedirs(folder, exist_ok=True)
        await self._stop_leftover()
        await self._spawn()
        self._watcher = asyncio.create_task(
            keep_running("comfyui supervisor", self._watch, backoff_max=self.cfg.backoff_max),
            name="comfyui-supervisor",
        )

    def helpers(self) -> list[asyncio.Task[None]]:
        """The restart watcher, watched by the worker like its own helpers."""
        return [self._watcher] if self._watcher else []

    async def _spawn(self) -> None:
        parent = os.getpid()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cfg.comfyui_dir,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            # prctl only in the child: no locks, no allocation that could deadlock after fork
            preexec_fn=lambda: _die_with(parent),
        )
        self._record(self.proc.pid)
        log.info("started ComfyUI (pid %s): %s", self.proc.pid, " ".join(self.argv[1:]))

    def _record(self, pid: int | None) -> None:
        try:
            if pid is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.pid_file)
                return
            tmp = f"{self.pid_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"pid": pid, "argv": self.argv}, fh)
            os.replace(tmp, self.pid_file)
        except OSError as exc:
            log.warning("cannot record ComfyUI's pid in %s: %s", self.pid_file, exc)

    def leftover(self) -> int | None:
        """The pid of a ComfyUI an earlier run of this worker started and left running."""
        try:
            with open(self.pid_file, encoding="utf-8") as fh:
                doc = json.load(fh)
            pid = int(doc["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # Only the very command line this worker runs (its port included): a recycled pid, or
        # another worker's ComfyUI, is someone else's.
        argv = list(doc.get("argv") or [])
        return pid if pid > 1 and argv == self.argv and _cmdline(pid) == argv else None

    async def _stop_leftover(self) -> None:
        pid = self.leftover()
        if pid is None:
            return
        log.warning("stopping ComfyUI (pid %d) left running by an earlier run of this worker", pid)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _cmdline(pid):
                await asyncio.sleep(0.1)
            if not _cmdline(pid):
                break
        self._record(None)

    async def _watch(self) -> None:
        """Restart ComfyUI if it exits on its own; back off when it keeps dying."""
        delay = 1.0
        while True:
            proc = self.proc
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            async with self._lock:
                if self._stopping or proc is not self.proc:
                    if self._stopping:
                        return
                    continue
                self.states.set("comfyui process", "dead", f"exit code {code}", logging.ERROR)
                if time.monotonic() - started > 60:
                    delay = 1.0
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.backoff_max)
                self.restarts += 1
                await self._spawn()
                self.states.set("comfyui process", "running")

    async def _terminate(self, grace: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped (frozen) ComfyUI acts on it too
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("ComfyUI did not stop within %.0f s of SIGTERM; killing it", grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def restart(self, grace: float = 10.0) -> None:
        """Kill the current ComfyUI and start a new one (used when a prompt will not stop)."""
        async with self._lock:
            old = self.proc
            await self._terminate(grace)
            self.restarts += 1
            await self._spawn()
            log.info("restarted ComfyUI (old pid %s, new pid %s)", old and old.pid, self.proc.pid)

    async def stop(self, grace: float = 10.0) -> None:
        async with self._lock:
            self._stopping = True
            await self._terminate(grace)
            self._record(None)
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None
