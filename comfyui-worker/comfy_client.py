"""Client for ComfyUI v0.11.0's HTTP and websocket API (CONTRACTS.md §2).

One websocket per worker, with a fixed clientId, carries the end of each prompt (`executing`
with `node: null`, sent after the history entry is written), so a finished job is noticed in
milliseconds instead of a poll period. A websocket can drop or miss a message, so a slow poll of
/history backs it up, and a reconnect triggers an immediate poll of every prompt in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from jobs import JobFailure
from logs import StateLog

log = logging.getLogger("comfyui_worker.comfy")

# The websocket is retried after 50 ms, doubling to BACKOFF_MAX; the delay starts over only
# after a connection that stayed up this long.
WS_FIRST_RETRY = 0.05
WS_STABLE_AFTER = 5.0
# An execution error with one of these (and not out of memory) is the GPU's fault, not the
# workflow's: the job goes back to the queue, and repeated ones take the worker out of service.
GPU_FAULT_MARKERS = (
    "CUDA error",
    "CUDA driver",
    "CUDA-capable device",
    "no CUDA GPUs are available",
    "cudaErrorSystemNotReady",
    "system not yet initialized",
    "GPU is lost",
    "CUBLAS_STATUS_NOT_INITIALIZED",
    "NVML",
)
OOM_MARKERS = ("OutOfMemoryError", "out of memory", "Allocation on device")


class ComfyUnavailable(Exception):
    """ComfyUI did not answer: not the job's fault, so the job goes back to the queue."""


@dataclass
class _Watch:
    """What the websocket has said about one prompt."""

    signal: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False


@dataclass
class Outcome:
    """A finished prompt as recorded in ComfyUI's history."""

    status: str  # success | error | interrupted
    outputs: dict[str, Any]
    execution_ms: float | None
    error: dict[str, Any] | None = None


class ComfyClient:
    """Submits prompts and follows them to the end; see the module docstring for why both paths."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        http_timeout: float = 900.0,
        poll_interval: float = 2.0,
        backoff_max: float = 30.0,
        states: StateLog | None = None,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.client_id = client_id
        self.http_timeout = http_timeout
        self.poll_interval = poll_interval
        self.backoff_max = backoff_max
        self.states = states or StateLog(log)
        self.connected = asyncio.Event()
        self.version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws_task: asyncio.Task[None] | None = None
        self._watches: dict[str, _Watch] = {}
        self.reconnects = 0

    async def start(self) -> None:
        """Open the HTTP session and start the websocket loop (which reconnects on its own)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.http_timeout, sock_connect=10)
        )
        self._ws_task = asyncio.create_task(self._ws_loop(), name="comfyui-ws")

    async def close(self) -> None:
        if self._ws_task:
            self._ws_task.cancel()
            await asyncio.gather(self._ws_task, return_exceptions=True)
        if self._session:
            await self._session.close()

    # -- websocket -------------------------------------------------------------------------

    async def _ws_loop(self) -> None:
        assert self._session is not None
        url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        delay = WS_FIRST_RETRY
        while True:
            connected_at = None
            try:
                async with self._session.ws_connect(
                    url, heartbeat=30, max_msg_size=64 * 1024 * 1024, timeout=10
                ) as ws:
                    connected_at = time.monotonic()
                    await self._on_connect()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self._on_message(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
                reason = "websocket closed"
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            self.connected.clear()
            self.states.set("comfyui", "down", reason, logging.WARNING)
            self._poke_all()
            # Back to quick retries only after a connection that held: a ComfyUI that accepts
            # and drops the websocket at once is retried with growing delays, not in a loop.
            if connected_at is not None and time.monotonic() - connected_at >= WS_STABLE_AFTER:
                delay = WS_FIRST_RETRY
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _on_connect(self) -> None:
        try:
            stats = await self.system_stats()
            self.version = (stats.get("system") or {}).get("comfyui_version") or self.version
        except ComfyUnavailable:
            pass
        self.connected.set()
        self.states.set("comfyui", "up", f"version {self.version}")
        # Events sent while we were away are lost: look at history now.
        self._poke_all()
        with contextlib.suppress(ComfyUnavailable):
            await self.drop_orphans()

    async def drop_orphans(self) -> list[str]:
        """Stop prompts of our clientId that no one waits for (left by a crashed worker run).

        With one worker per ComfyUI they would otherwise hold the queue until they finish.
        """
        status, body = await self._request("GET", "/queue")
        if status != 200 or not isinstance(body, dict):
            return []
        dropped = []
        for section in ("queue_running", "queue_pending"):
            for item in body.get(section) or []:
                if not isinstance(item, list) or len(item) < 4 or not isinstance(item[3], dict):
                    continue
                prompt_id = item[1]
                if item[3].get("client_id") == self.client_id and prompt_id not in self._watches:
                    log.warning("stopping prompt %s left in ComfyUI by a previous run", prompt_id)
                    await self.interrupt(prompt_id)
                    dropped.append(prompt_id)
        return dropped

    def _poke_all(self) -> None:
        for watch in self._watches.values():
            watch.signal.set()

    def _on_message(self, text: str) -> None:
        try:
            msg = json.loads(text)
            kind = msg.get("type")
            data = msg.get("data") or {}
            prompt_id = data.get("prompt_id")
        except (ValueError, AttributeError):
            return
        watch = self._watches.get(prompt_id) if isinstance(prompt_id, str) else None
        if watch is None:
            return
        if kind == "executing" and data.get("node") is None:
            watch.finished = True
            watch.signal.set()
        elif kind in ("execution_error", "execution_interrupted", "execution_success"):
            # The end is near; `executing` with node null follows once history is written.
            watch.signal.set()

    # -- HTTP ------------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, timeout: float | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """One HTTP call; `timeout` bounds it below COMFYUI_TIMEOUT (the stop path's calls)."""
        assert self._session is not None, "start() first"
        if timeout is not None:
            if timeout <= 0:
                raise ComfyUnavailable("no time left for the call")
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ComfyUnavailable(str(exc) or type(exc).__name__) from exc
        if not body:
            return status, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    async def system_stats(self) -> dict[str, Any]:
        status, body = await self._request("GET", "/system_stats")
        if status != 200 or not isinstance(body, dict):
            raise ComfyUnavailable(f"/system_stats answered HTTP {status}")
        return body

    async def object_info(self) -> dict[str, Any]:
        """Every node's input schema (not cheap on real ComfyUI: read once per worker)."""
        status, body = await self._request("GET", "/object_info")
        if status != 200 or not isinstance(body, dict):
            raise ComfyUnavailable(f"/object_info answered HTTP {status}")
        return body

    async def submit(self, workflow: dict[str, Any], prompt_id: str) -> None:
        """Queue a prompt; a rejected prompt raises JobFailure with ComfyUI's node_errors intact."""
        self._watches.setdefault(prompt_id, _Watch())
        payload = {
            "prompt": workflow,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
            "extra_data": {"preview_method": "none"},
        }
        try:
            status, body = await self._request("POST", "/prompt", json=payload)
        except ComfyUnavailable:
            self.forget(prompt_id)
            raise
        body = body if isinstance(body, dict) else {"error": body}
        node_errors = body.get("node_errors") or {}
        if status == 200 and not node_errors:
            return
        self.forget(prompt_id)
        if status >= 500:
            raise JobFailure("comfyui", f"ComfyUI answered HTTP {status} to the prompt: {body}")
        error = body.get("error")
        if status == 200:
            # ComfyUI queued the outputs that passed and dropped the rest: stop what it queued.
            with contextlib.suppress(ComfyUnavailable):
                await self.interrupt(prompt_id)
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "some outputs failed validation and were dropped",
            }
        elif not isinstance(error, dict):
            error = {"type": "error", "message": str(error or f"HTTP {status}")}
        raise JobFailure(
            "node_errors",
            _describe_rejection(error, node_errors),
            {"error": error, "node_errors": node_errors, "http_status": status},
        )

    def forget(self, prompt_id: str) -> None:
        self._watches.pop(prompt_id, None)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, body = await self._request("GET", f"/history/{prompt_id}")
        if status != 200 or not isinstance(body, dict):
            return None
        entry = body.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def is_known(self, prompt_id: str) -> bool:
        """False when ComfyUI has no record of the prompt (lost in a restart)."""
        status, _ = await self._request("GET", f"/api/jobs/{prompt_id}")
        return status != 404

    async def wait(self, prompt_id: str) -> Outcome:
        """Wait for the prompt to end: websocket first, /history every poll interval."""
        watch = self._watches.setdefault(prompt_id, _Watch())
        unknown = 0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watch.signal.wait(), self.poll_interval)
            watch.signal.clear()
            try:
                entry = await self.history(prompt_id)
            except ComfyUnavailable:
                continue
            if entry is not None:
                self.forget(prompt_id)
                return parse_outcome(entry)
            if watch.finished:
                watch.finished = False
                continue
            try:
                unknown = 0 if await self.is_known(prompt_id) else unknown + 1
            except ComfyUnavailable:
                continue
            if unknown >= 2:
                self.forget(prompt_id)
                raise JobFailure(
                    "comfyui",
                    "ComfyUI has no record of the prompt any more (it restarted mid-job)",
                )

    async def interrupt(self, prompt_id: str, timeout: float | None = None) -> None:
        """Cooperative stop of a running prompt; also drops it if it is still queued.

        With `timeout`, both calls together take at most that many seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else deadline - time.monotonic()

        with contextlib.suppress(ComfyUnavailable):
            await self._request("POST", "/queue", left(), json={"delete": [prompt_id]})
        await self._request("POST", "/interrupt", left(), json={"prompt_id": prompt_id})

    async def free(self, timeout: float | None = None) -> None:
        """Ask ComfyUI to unload models and empty torch's cache (acts asynchronously)."""
        await self._request(
            "POST", "/free", timeout, json={"unload_models": True, "free_memory": True}
        )

    async def delete_history(self, prompt_id: str, timeout: float | None = None) -> None:
        await self._request("POST", "/history", timeout, json={"delete": [prompt_id]})

    async def download(self, filename: str, subfolder: str, kind: str, dest: str) -> int:
        """Fetch a file through /view (used when ComfyUI's output folder is not local)."""
        assert self._session is not None
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        try:
            async with self._session.get(self.base + "/view", params=params) as resp:
                if resp.status != 200:
                    raise JobFailure(
                        "outputs", f"ComfyUI /view answered HTTP {resp.status} for {filename!r}"
                    )
                size = 0
                tmp = dest + ".part"
                with open(tmp, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        fh.write(chunk)
                        size += len(chunk)
                os.replace(tmp, dest)
                return size
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ComfyUnavailable(str(exc) or type(exc).__name__) from exc


def parse_outcome(entry: dict[str, Any]) -> Outcome:
    """Reads a history entry: status, outputs, ComfyUI's own execution time, and any error."""
    status_block = entry.get("status") or {}
    messages = status_block.get("messages") or []
    started = ended = None
    error = None
    interrupted = False
    for item in messages:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            continue
        event, data = item
        data = data if isinstance(data, dict) else {}
        stamp = data.get("timestamp")
        if event == "execution_start":
            started = stamp
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            ended = stamp
            if event == "execution_error":
                error = data
            elif event == "execution_interrupted":
                interrupted = True
    execution_ms = None
    if isinstance(started, (int, float)) and isinstance(ended, (int, float)):
        execution_ms = float(ended - started)
    if error is not None:
        status = "error"
    elif interrupted:
        status = "interrupted"
    elif status_block.get("status_str") == "error":
        status = "error"
        error = {"exception_type": "unknown", "exception_message": "ComfyUI reported an error"}
    else:
        status = "success"
    outputs = entry.get("outputs") or {}
    return Outcome(status, outputs if isinstance(outputs, dict) else {}, execution_ms, error)


def execution_failure(error: dict[str, Any]) -> JobFailure:
    """A JobFailure for an `execution_error`, recognising CUDA out-of-memory."""
    exc_type = str(error.get("exception_type") or "Exception")
    message = str(error.get("exception_message") or "").strip()
    node = error.get("node_id")
    node_type = error.get("node_type")
    where = f" in node {node} ({node_type})" if node is not None else ""
    details = {
        key: error.get(key)
        for key in ("exception_type", "exception_message", "node_id", "node_type", "traceback")
        if error.get(key) is not None
    }
    if any(marker in exc_type or marker in message for marker in OOM_MARKERS):
        return JobFailure(
            "out_of_memory", f"GPU out of memory{where}: {exc_type}: {message}", details
        )
    text = f"{exc_type}: {message}".lower()
    if any(marker.lower() in text for marker in GPU_FAULT_MARKERS):
        return JobFailure("gpu", f"GPU fault{where}: {exc_type}: {message}", details)
    return JobFailure("execution_error", f"ComfyUI error{where}: {exc_type}: {message}", details)


def _describe_rejection(error: dict[str, Any], node_errors: dict[str, Any]) -> str:
    """One readable line per failing node: `node 4 (CheckpointLoaderSimple): value_not_in_list`."""
    head = f"ComfyUI rejected the workflow ({error.get('type', 'error')}): "
    head += str(error.get("message") or "")
    lines = [head.rstrip(": ")]
    for node_id, info in node_errors.items():
        info = info if isinstance(info, dict) else {}
        for err in info.get("errors") or []:
            err = err if isinstance(err, dict) else {"message": str(err)}
            detail = err.get("details") or err.get("message") or err.get("type")
            lines.append(
                f"node {node_id} ({info.get('class_type', '?')}): {err.get('type', 'error')}: "
                f"{detail}"
            )
    return "\n".join(lines)
