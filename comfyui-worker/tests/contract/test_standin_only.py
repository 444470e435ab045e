"""Behaviour only the stand-in has: its test-only nodes, knobs and simulated GPU memory."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.integration

STANDIN_MAIN = Path(__file__).resolve().parent.parent / "comfyui_standin" / "main.py"


def chain(class_type: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": class_type, "inputs": {**inputs, "images": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"standin/{uuid.uuid4().hex[:8]}"},
        },
    }


def test_sleep_reports_progress_per_step(standin, api):
    # Steps of 0.12 s: past ComfyUI's 0.1 s progress throttle, so every step is reported.
    run = api.run(standin, chain("StandInSleep", {"seconds": 0.48, "steps": 4}))
    progress = run.of_type("progress")
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [
        (1, 4, "2"),
        (2, 4, "2"),
        (3, 4, "2"),
        (4, 4, "2"),
    ]
    assert run.history["status"]["status_str"] == "success"


def test_test_nodes_always_run(standin, api):
    prompt = chain("StandInSleep", {"seconds": 0.0, "steps": 1})
    api.run(standin, prompt)
    again = api.run(standin, prompt)
    assert again.of_type("execution_cached")[0]["nodes"] == ["1"]
    assert len(again.history["outputs"]["3"]["images"]) == 1


def test_slow_interrupt_finishes_its_stretch_first(standin, api):
    started = []

    async def on_message(session, kind, data, prompt_id):
        if kind == "executing" and data["node"] == "2":
            started.append(prompt_id)
            async with session.post(f"{standin.url}/interrupt", json={"prompt_id": prompt_id}):
                pass

    run = api.run(standin, chain("StandInSlowInterrupt", {"seconds": 0.5}), on_message=on_message)
    assert started
    (interrupted,) = run.of_type("execution_interrupted")
    assert interrupted["node_id"] == "2"
    assert run.of_type("progress") == []


def test_hang_ignores_interrupt_and_blocks_the_queue(standin_factory, api):
    server = standin_factory()

    async def scenario() -> tuple[dict, dict, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{server.url}/prompt", json={"prompt": chain("StandInHang", {})}
            ) as r:
                hung = (await r.json())["prompt_id"]
            await asyncio.sleep(0.3)
            async with session.post(f"{server.url}/interrupt"):
                pass
            await asyncio.sleep(0.5)
            async with session.get(f"{server.url}/history/{hung}") as r:
                history = await r.json()
            async with session.get(f"{server.url}/api/jobs/{hung}") as r:
                job = await r.json()
            async with session.get(f"{server.url}/system_stats") as r:
                stats = await r.json()
            return history, job, stats

    history, job, stats = asyncio.run(scenario())
    assert history == {}
    assert job["status"] == "in_progress"
    assert stats["system"]["comfyui_version"] == "0.11.0"
    server.stop()
    assert server.process.returncode is not None


def test_generic_exception_classes(standin, api):
    run = api.run(standin, chain("StandInRaise", {"message": "x", "exception": "RuntimeError"}))
    assert run.of_type("execution_error")[0]["exception_type"] == "RuntimeError"
    run = api.run(standin, chain("StandInRaise", {"message": "x", "exception": "Exception"}))
    assert run.of_type("execution_error")[0]["exception_type"] == "Exception"


def test_drop_websockets_leaves_polling(standin_factory, api):
    server = standin_factory()
    prompt = chain("StandInDropWebSockets", {"refuse_seconds": 0.5, "seconds": 0.2})

    async def scenario() -> tuple[list[str], Any, int, dict]:
        client_id = uuid.uuid4().hex
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws,
        ):
            async with session.post(
                f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}
            ) as r:
                prompt_id = (await r.json())["prompt_id"]
            seen = []
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                seen.append(json.loads(msg.data)["type"])
            close_code = ws.close_code
            async with session.get(f"{server.url}/ws?clientId={client_id}") as r:
                refused = r.status
            history: dict = {}
            for _ in range(100):
                async with session.get(f"{server.url}/history/{prompt_id}") as r:
                    history = await r.json()
                if history:
                    break
                await asyncio.sleep(0.05)
            return seen, close_code, refused, history[prompt_id]

    seen, close_code, refused, history = asyncio.run(scenario())
    assert "execution_success" not in seen and "executing" in seen
    assert close_code == 1011
    assert refused == 503
    assert history["status"]["status_str"] == "success"

    time.sleep(0.6)  # the refusal window is over: websockets work again
    assert api.run(server, chain("StandInSleep", {"seconds": 0, "steps": 1})).status == 200


def test_simulated_gpu_memory_and_free(standin_factory, api):
    env = {"COMFYUI_STANDIN_VRAM_TOTAL_MB": "1000", "COMFYUI_STANDIN_VRAM_USED_MB": "100"}
    server = standin_factory(env=env, cpu=False)
    mib, checkpoint = 1024 * 1024, 1024  # the harness's present.safetensors has 1024 bytes
    device = api.call(server, "GET", "/system_stats")[1]["devices"][0]
    assert device["type"] == "cuda" and device["index"] == 0
    assert device["vram_total"] == 1000 * mib
    assert device["vram_free"] == 900 * mib
    prompt = {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "present.safetensors"},
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    run = api.run(server, prompt)
    assert run.history["status"]["status_str"] == "success"
    device = api.call(server, "GET", "/system_stats")[1]["devices"][0]
    assert device["vram_free"] == 900 * mib - checkpoint
    assert device["torch_vram_total"] == checkpoint + 64 * mib
    assert device["torch_vram_free"] == 64 * mib
    api.call(server, "POST", "/free", {"unload_models": True})
    for _ in range(100):  # /free acts in the execution thread, shortly after it answers
        device = api.call(server, "GET", "/system_stats")[1]["devices"][0]
        if device["vram_free"] == 900 * mib:
            break
        time.sleep(0.05)
    assert device["vram_free"] == 900 * mib
    assert device["torch_vram_total"] == 0


def test_startup_delay_and_unknown_flags(standin_factory, api):
    server = standin_factory(
        extra_args=["--standin-startup-delay", "0.3", "--highvram", "--preview-method", "auto"]
    )
    assert api.call(server, "GET", "/system_stats")[0] == 200
    log = server.log_tail()
    assert "simulating a slow start: 0.3 s before listening" in log
    assert "ignores these flags: --highvram --preview-method auto" in log


def test_base_directory_without_custom_nodes_fails_like_comfyui(tmp_path):
    # Real ComfyUI v0.11.0 dies at start when --base-directory has no custom_nodes folder.
    result = subprocess.run(
        [sys.executable, str(STANDIN_MAIN), "--port", "1", "--base-directory", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "No such file or directory" in result.stderr and "custom_nodes" in result.stderr


def test_sigterm_stops_promptly(standin_factory):
    server = standin_factory()
    server.process.terminate()
    assert server.process.wait(timeout=10) == 0
