"""ComfyUI v0.11.0's API as a client sees it, on the stand-in and, when set up, the real one.

Each prompt gets its own filename prefix and image colour, so ComfyUI's output cache (keyed by a
node's inputs) never links two tests.
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def unique_prefix() -> str:
    return f"contract/{uuid.uuid4().hex[:10]}"


def image_to_file(prefix: str, width: int = 16, height: int = 8, batch: int = 1) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": width,
                "height": height,
                "batch_size": batch,
                "color": random.randrange(0x1000000),
            },
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def with_test_node(prefix: str, class_type: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """EmptyImage -> test node -> SaveImage."""
    prompt = image_to_file(prefix)
    prompt["3"] = {"class_type": class_type, "inputs": {**inputs, "images": ["1", 0]}}
    prompt["2"]["inputs"]["images"] = ["3", 0]
    return prompt


def test_system_stats_reports_version_and_device(comfy, api):
    status, stats = api.call(comfy, "GET", "/system_stats")
    assert status == 200
    assert stats["system"]["comfyui_version"] == "0.11.0"
    for key in ("os", "ram_total", "ram_free", "python_version", "pytorch_version", "argv"):
        assert key in stats["system"]
    (device,) = stats["devices"]
    for key in ("name", "type", "index", "vram_total", "vram_free"):
        assert key in device
    for key in ("torch_vram_total", "torch_vram_free"):
        assert isinstance(device[key], int)
    assert device["type"] == "cpu"  # both run with --cpu here
    assert 0 < device["vram_free"] <= device["vram_total"]


def test_empty_image_to_save_image_events_history_and_file(comfy, api):
    prefix = unique_prefix()
    run = api.run(comfy, image_to_file(prefix, width=16, height=8, batch=2))

    assert run.status == 200
    assert run.response["node_errors"] == {}
    assert isinstance(run.response["number"], int)
    assert run.types() == [
        "execution_start",
        "execution_cached",
        "executing",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    pid = run.prompt_id
    start, cached = run.of_type("execution_start")[0], run.of_type("execution_cached")[0]
    assert start["prompt_id"] == pid and isinstance(start["timestamp"], int)
    assert cached == {"nodes": [], "prompt_id": pid, "timestamp": cached["timestamp"]}
    executing = run.of_type("executing")
    assert executing[0] == {"node": "1", "display_node": "1", "prompt_id": pid}
    assert executing[1] == {"node": "2", "display_node": "2", "prompt_id": pid}
    assert executing[2] == {"node": None, "prompt_id": pid}
    name = prefix.split("/")[1]
    images = [
        {"filename": f"{name}_00001_.png", "subfolder": "contract", "type": "output"},
        {"filename": f"{name}_00002_.png", "subfolder": "contract", "type": "output"},
    ]
    (executed,) = run.of_type("executed")
    assert executed == {
        "node": "2",
        "display_node": "2",
        "output": {"images": images},
        "prompt_id": pid,
    }
    assert run.of_type("execution_success")[0]["prompt_id"] == pid

    # progress_state: every non-pending node, ending with both finished.
    last_state = run.of_type("progress_state")[-1]
    assert last_state["prompt_id"] == pid
    assert {n: s["state"] for n, s in last_state["nodes"].items()} == {
        "1": "finished",
        "2": "finished",
    }
    assert set(last_state["nodes"]["2"]) == {
        "value",
        "max",
        "state",
        "node_id",
        "prompt_id",
        "display_node_id",
        "parent_node_id",
        "real_node_id",
    }

    # History is written before the final "executing": it was read right after that message.
    history = run.history
    assert history["outputs"] == {"2": {"images": images}}
    assert history["status"]["status_str"] == "success"
    assert history["status"]["completed"] is True
    assert [m[0] for m in history["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    _number, prompt_id, prompt, extra_data, outputs = history["prompt"]
    assert prompt_id == pid and prompt["2"]["class_type"] == "SaveImage"
    assert extra_data["client_id"] == run.client_id and isinstance(extra_data["create_time"], int)
    assert outputs == ["2"]
    assert history["meta"]["2"] == {
        "node_id": "2",
        "display_node": "2",
        "parent_node": None,
        "real_node_id": "2",
    }

    for image in images:
        data = (comfy.output_dir / image["subfolder"] / image["filename"]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24]) == (16, 8)
    status, body = api.call(
        comfy, "GET", f"/view?filename={images[0]['filename']}&subfolder=contract&type=output"
    )
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert api.call(comfy, "GET", "/view?filename=missing.png&type=output")[0] == 404
    assert api.call(comfy, "GET", "/view?filename=../etc/passwd")[0] == 400


def test_jobs_api_and_history_listing(comfy, api):
    run = api.run(comfy, image_to_file(unique_prefix()))
    status, job = api.call(comfy, "GET", f"/api/jobs/{run.prompt_id}")
    assert status == 200
    assert job["id"] == run.prompt_id and job["status"] == "completed"
    assert job["outputs_count"] == 1
    assert job["preview_output"]["nodeId"] == "2"
    assert job["preview_output"]["mediaType"] == "images"
    assert job["outputs"] == run.history["outputs"]
    assert job["execution_status"]["status_str"] == "success"
    assert job["execution_start_time"] <= job["execution_end_time"]
    assert job["workflow"]["prompt"]["1"]["class_type"] == "EmptyImage"

    status, listing = api.call(comfy, "GET", "/api/jobs?status=completed&limit=1")
    assert status == 200 and listing["pagination"]["limit"] == 1
    assert len(listing["jobs"]) == 1
    assert api.call(comfy, "GET", "/api/jobs?status=bogus")[0] == 400
    status, missing = api.call(comfy, "GET", f"/api/jobs/{uuid.uuid4()}")
    assert (status, missing) == (404, {"error": "Job not found"})

    status, history = api.call(comfy, "GET", "/history?max_items=1")
    assert status == 200 and len(history) == 1
    assert api.call(comfy, "GET", f"/history/{uuid.uuid4()}") == (200, {})
    assert api.call(comfy, "GET", f"/api/history/{run.prompt_id}")[1].keys() == {run.prompt_id}


def test_history_delete_and_clear(comfy, api):
    first = api.run(comfy, image_to_file(unique_prefix()))
    second = api.run(comfy, image_to_file(unique_prefix()))
    assert api.call(comfy, "POST", "/history", {"delete": [first.prompt_id]})[0] == 200
    assert api.call(comfy, "GET", f"/history/{first.prompt_id}")[1] == {}
    assert second.prompt_id in api.call(comfy, "GET", f"/history/{second.prompt_id}")[1]
    assert api.call(comfy, "POST", "/history", {"clear": True})[0] == 200
    assert api.call(comfy, "GET", "/history")[1] == {}


def test_client_prompt_id_is_kept(comfy, api):
    prompt_id = str(uuid.uuid4())
    run = api.run(comfy, image_to_file(unique_prefix()), prompt_id=prompt_id)
    assert run.status == 200 and run.prompt_id == prompt_id
    assert run.history["prompt"][1] == prompt_id


def test_identical_prompt_runs_from_cache(comfy, api):
    prompt = image_to_file(unique_prefix())
    first = api.run(comfy, prompt)
    files_before = sorted(p.name for p in (comfy.output_dir / "contract").iterdir())
    second = api.run(comfy, prompt)
    assert second.of_type("execution_cached")[0]["nodes"] == ["1", "2"]
    assert second.types() == [
        "execution_start",
        "execution_cached",
        "executed",
        "execution_success",
        "executing",
    ]
    assert second.of_type("executed")[0]["output"] == first.of_type("executed")[0]["output"]
    assert second.history["outputs"] == first.history["outputs"]
    assert sorted(p.name for p in (comfy.output_dir / "contract").iterdir()) == files_before


def test_events_go_only_to_the_submitting_client(comfy, api):
    async def scenario() -> tuple[Any, list[str]]:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{comfy.url}/ws?clientId={uuid.uuid4().hex}") as other,
        ):
            run = await api.arun(comfy, image_to_file(unique_prefix()))
            seen = []
            while True:
                try:
                    msg = await other.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    break
                seen.append(msg.json()["type"])
            return run, seen

    run, seen = asyncio.run(scenario())
    assert run.status == 200
    assert set(seen) <= {"status"}, seen
    assert "status" in seen


def test_websocket_greets_with_status_and_sid(comfy):
    async def greet() -> dict[str, Any]:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{comfy.url}/ws?clientId=greeting-client") as ws,
        ):
            return await ws.receive_json(timeout=10)

    first = asyncio.run(greet())
    assert first["type"] == "status"
    assert first["data"]["sid"] == "greeting-client"
    assert isinstance(first["data"]["status"]["exec_info"]["queue_remaining"], int)


def test_unknown_node_class_is_invalid_prompt(comfy, api):
    prompt = image_to_file(unique_prefix())
    prompt["3"] = {"class_type": "NoSuchNode", "inputs": {}}
    run = api.run(comfy, prompt)
    assert run.status == 400
    assert run.response == {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNode does not exist.",
            "details": "Node ID '#3'",
            "extra_info": {},
        },
        "node_errors": {},
    }


def test_prompt_without_outputs(comfy, api):
    prompt = {"1": image_to_file("x")["1"]}
    run = api.run(comfy, prompt)
    assert run.status == 400
    assert run.response["error"]["type"] == "prompt_no_outputs"
    assert run.response["error"]["message"] == "Prompt has no outputs"
    assert run.response["node_errors"] == {}


def test_missing_prompt(comfy, api):
    status, body = api.call(comfy, "POST", "/prompt", {"client_id": "x"})
    assert status == 400
    assert body["error"]["type"] == "no_prompt"


def test_bad_inputs_fail_validation_with_node_errors(comfy, api):
    prompt = image_to_file(unique_prefix())
    prompt["1"]["inputs"]["width"] = 0
    del prompt["1"]["inputs"]["height"]
    run = api.run(comfy, prompt)
    assert run.status == 400
    error = run.response["error"]
    assert error["type"] == "prompt_outputs_failed_validation"
    assert error["message"] == "Prompt outputs failed validation"
    node = run.response["node_errors"]["1"]
    assert node["class_type"] == "EmptyImage"
    assert node["dependent_outputs"] == ["2"]
    by_type = {e["type"]: e for e in node["errors"]}
    assert set(by_type) == {"value_smaller_than_min", "required_input_missing"}
    assert by_type["value_smaller_than_min"]["message"] == "Value 0 smaller than min of 1"
    assert by_type["value_smaller_than_min"]["details"] == "width"
    assert by_type["value_smaller_than_min"]["extra_info"]["received_value"] == 0
    assert by_type["required_input_missing"] == {
        "type": "required_input_missing",
        "message": "Required input is missing",
        "details": "height",
        "extra_info": {"input_name": "height"},
    }
    assert "2" not in run.response["node_errors"]


def test_wrong_input_type_is_reported(comfy, api):
    prompt = image_to_file(unique_prefix())
    prompt["1"]["inputs"]["width"] = "wide"
    run = api.run(comfy, prompt)
    assert run.status == 400
    (err,) = run.response["node_errors"]["1"]["errors"]
    assert err["type"] == "invalid_input_type"
    assert err["message"] == "Failed to convert an input value to a INT value"


def test_missing_checkpoint_is_value_not_in_list(comfy, api):
    prompt = {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "absent.safetensors"},
        },
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    run = api.run(comfy, prompt)
    assert run.status == 400
    assert run.response["error"]["type"] == "prompt_outputs_failed_validation"
    node = run.response["node_errors"]["4"]
    assert node["class_type"] == "CheckpointLoaderSimple"
    assert node["dependent_outputs"] == ["5"]
    (err,) = node["errors"]
    assert err["type"] == "value_not_in_list"
    assert err["message"] == "Value not in list"
    assert err["details"] == "ckpt_name: 'absent.safetensors' not in ['present.safetensors']"
    assert err["extra_info"]["input_name"] == "ckpt_name"
    assert err["extra_info"]["received_value"] == "absent.safetensors"


def test_partly_invalid_prompt_is_accepted_with_node_errors(comfy, api):
    prompt = image_to_file(unique_prefix())
    prompt["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.sft"}}
    prompt["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    run = api.run(comfy, prompt)
    assert run.status == 200
    assert list(run.response["node_errors"]) == ["4"]
    assert run.response["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert run.history["status"]["status_str"] == "success"
    assert list(run.history["outputs"]) == ["2"]
    assert run.history["prompt"][4] == ["2"]


def test_text_output(comfy, api):
    prompt = {"1": {"class_type": "PreviewAny", "inputs": {"source": f"hello {uuid.uuid4()}"}}}
    run = api.run(comfy, prompt)
    assert run.status == 200
    text = prompt["1"]["inputs"]["source"]
    assert run.of_type("executed")[0]["output"] == {"text": [text]}
    assert run.history["outputs"] == {"1": {"text": [text]}}


def test_object_info_lists_nodes_and_model_files(comfy, api):
    status, info = api.call(comfy, "GET", "/object_info/CheckpointLoaderSimple")
    assert status == 200
    ckpt = info["CheckpointLoaderSimple"]
    assert ckpt["input"]["required"]["ckpt_name"][0] == ["present.safetensors"]
    assert ckpt["output"] == ["MODEL", "CLIP", "VAE"]
    assert ckpt["output_node"] is False
    status, info = api.call(comfy, "GET", "/object_info")
    assert status == 200
    save = info["SaveImage"]
    assert save["output_node"] is True and save["output"] == []
    assert save["input_order"] == {
        "required": ["images", "filename_prefix"],
        "hidden": ["prompt", "extra_pnginfo"],
    }
    assert info["EmptyImage"]["input"]["required"]["width"] == [
        "INT",
        {"default": 512, "min": 1, "max": 16384, "step": 1},
    ]
    assert api.call(comfy, "GET", "/object_info/NoSuchNode") == (200, {})


def test_queue_endpoints_when_idle(comfy, api):
    assert api.call(comfy, "GET", "/queue") == (200, {"queue_running": [], "queue_pending": []})
    assert api.call(comfy, "GET", "/prompt") == (200, {"exec_info": {"queue_remaining": 0}})
    assert api.call(comfy, "POST", "/queue", {"clear": True})[0] == 200
    assert api.call(comfy, "POST", "/queue", {"delete": [str(uuid.uuid4())]})[0] == 200


def test_interrupt_and_free_answer_at_once(comfy, api):
    assert api.call(comfy, "POST", "/interrupt")[0] == 200
    assert api.call(comfy, "POST", "/interrupt", {"prompt_id": str(uuid.uuid4())})[0] == 200
    assert api.call(comfy, "POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
    # An interrupt sent while idle does not hit the next prompt.
    run = api.run(comfy, image_to_file(unique_prefix()))
    assert run.history["status"]["status_str"] == "success"


def test_interrupt_running_prompt(comfy, api):
    stray = str(uuid.uuid4())
    sent: list[str] = []

    async def on_message(session, kind, data, prompt_id):
        if kind == "progress" and not sent:
            assert data == {"value": 1, "max": 200, "prompt_id": prompt_id, "node": "3"}
            # An interrupt for another prompt is ignored; one for this prompt stops it.
            async with session.post(f"{comfy.url}/interrupt", json={"prompt_id": stray}):
                pass
            async with session.post(f"{comfy.url}/interrupt", json={"prompt_id": prompt_id}):
                sent.append(prompt_id)

    prompt = with_test_node(unique_prefix(), "StandInSleep", {"seconds": 20.0, "steps": 200})
    run = api.run(comfy, prompt, on_message=on_message, timeout=30)
    assert sent
    assert run.types()[-2:] == ["execution_interrupted", "executing"]
    (interrupted,) = run.of_type("execution_interrupted")
    assert interrupted == {
        "prompt_id": run.prompt_id,
        "node_id": "3",
        "node_type": "StandInSleep",
        "executed": ["1"],
        "timestamp": interrupted["timestamp"],
    }
    assert run.history["status"]["status_str"] == "error"
    assert run.history["status"]["completed"] is False
    assert run.history["status"]["messages"][-1][0] == "execution_interrupted"
    assert run.history["outputs"] == {}
    assert api.call(comfy, "GET", f"/api/jobs/{run.prompt_id}")[1]["status"] == "cancelled"


def test_running_and_pending_prompts_are_visible(comfy, api):
    async def scenario():
        import aiohttp

        slow = with_test_node(unique_prefix(), "StandInSleep", {"seconds": 3.0, "steps": 30})
        quick = image_to_file(unique_prefix())
        async with aiohttp.ClientSession() as session:
            # The server is shared with earlier tests: start from an idle queue, so the
            # slow prompt is the one running and the quick one the only one pending.
            for _ in range(300):
                async with session.get(f"{comfy.url}/queue") as r:
                    idle = await r.json()
                if not idle["queue_running"] and not idle["queue_pending"]:
                    break
                await asyncio.sleep(0.1)
            async with session.post(f"{comfy.url}/prompt", json={"prompt": slow}) as r:
                slow_id = (await r.json())["prompt_id"]
            async with session.post(f"{comfy.url}/prompt", json={"prompt": quick}) as r:
                quick_id = (await r.json())["prompt_id"]
            async with session.get(f"{comfy.url}/api/jobs/{quick_id}") as r:
                pending = await r.json()
            async with session.get(f"{comfy.url}/queue") as r:
                queue = await r.json()
            async with session.get(f"{comfy.url}/history/{slow_id}") as r:
                slow_history = await r.json()
            async with session.post(f"{comfy.url}/queue", json={"delete": [quick_id]}):
                pass
            async with session.post(f"{comfy.url}/interrupt", json={"prompt_id": slow_id}):
                pass
            for _ in range(300):
                async with session.get(f"{comfy.url}/history/{slow_id}") as r:
                    if await r.json():
                        break
                await asyncio.sleep(0.1)
            async with session.get(f"{comfy.url}/api/jobs/{quick_id}") as r:
                deleted = r.status
            return slow_id, quick_id, pending, queue, slow_history, deleted

    slow_id, quick_id, pending, queue, slow_history, deleted = asyncio.run(scenario())
    assert slow_history == {}
    assert pending["id"] == quick_id and pending["status"] == "pending"
    assert [item[1] for item in queue["queue_pending"]] == [quick_id]
    assert len(queue["queue_running"][0]) == 5
    assert queue["queue_running"][0][1] == slow_id
    assert deleted == 404


def test_node_exception_is_execution_error(comfy, api):
    prompt = with_test_node(
        unique_prefix(), "StandInRaise", {"message": "boom", "exception": "ValueError"}
    )
    run = api.run(comfy, prompt)
    assert run.types()[-2:] == ["execution_error", "executing"]
    (error,) = run.of_type("execution_error")
    assert error["prompt_id"] == run.prompt_id
    assert error["node_id"] == "3" and error["node_type"] == "StandInRaise"
    assert error["exception_type"] == "ValueError"
    assert error["exception_message"] == "boom\n"
    assert error["executed"] == ["1"]
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert error["current_inputs"]["message"] == ["boom"]
    assert sorted(error["current_outputs"]) == ["1", "2", "3"]
    assert run.history["status"]["status_str"] == "error"
    assert run.history["status"]["messages"][-1][0] == "execution_error"
    _status, job = api.call(comfy, "GET", f"/api/jobs/{run.prompt_id}")
    assert job["status"] == "failed"
    assert job["execution_error"]["exception_type"] == "ValueError"


def test_cuda_out_of_memory_shape(comfy, api):
    prompt = with_test_node(unique_prefix(), "StandInOutOfMemory", {"allocate_mib": 20.0})
    run = api.run(comfy, prompt)
    (error,) = run.of_type("execution_error")
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert error["exception_message"].startswith("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert "This error means you ran out of memory on your GPU." in error["exception_message"]
    assert run.history["status"]["status_str"] == "error"


def test_reconnect_during_a_run_tells_the_current_node(comfy, api):
    async def scenario() -> list[dict[str, Any]]:
        import aiohttp

        client_id = uuid.uuid4().hex
        prompt = with_test_node(unique_prefix(), "StandInSleep", {"seconds": 20.0, "steps": 200})
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as first:
                body = {"prompt": prompt, "client_id": client_id}
                async with session.post(f"{comfy.url}/prompt", json=body) as r:
                    prompt_id = (await r.json())["prompt_id"]
                while True:
                    event = await first.receive_json(timeout=20)
                    if event["type"] == "progress":
                        break
            async with session.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as again:
                greeting = [await again.receive_json(timeout=10) for _ in range(2)]
                async with session.post(f"{comfy.url}/interrupt", json={"prompt_id": prompt_id}):
                    pass
                while True:
                    event = await again.receive_json(timeout=20)
                    if event["type"] == "executing" and event["data"]["node"] is None:
                        break
            return greeting

    status, executing = asyncio.run(scenario())
    assert status["type"] == "status"
    assert status["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert executing == {"type": "executing", "data": {"node": "3"}}


# ---- LoadImage and LoadImageMask: files named relative to the input folder, or not ----------


def write_png(path: Path, width: int, height: int, rgba: tuple[int, ...]) -> Path:
    """A solid 8-bit PNG, RGB for three values and RGBA for four (no PIL here)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    color_type = 6 if len(rgba) == 4 else 2
    rows = (b"\x00" + bytes(rgba) * width) * height
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def png_size_and_first_pixel(data: bytes) -> tuple[int, int, tuple[int, int, int]]:
    """(width, height, RGB of the first pixel) of an 8-bit RGB PNG such as SaveImage writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", header[:10])
    assert (depth, color_type) == (8, 2)
    first = zlib.decompress(idat)[1:4]  # a row's first pixel is stored as is, whatever the filter
    return width, height, (first[0], first[1], first[2])


def load_and_save(name: str, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def saved_image(comfy, run) -> tuple[int, int, tuple[int, int, int]]:
    assert run.status == 200 and run.response["node_errors"] == {}, run.response
    assert run.history["status"]["status_str"] == "success", run.history["status"]
    (image,) = run.history["outputs"]["2"]["images"]
    return png_size_and_first_pixel(
        (comfy.output_dir / image["subfolder"] / image["filename"]).read_bytes()
    )


def test_load_image_names_resolve_like_comfyui(comfy, api):
    tag = uuid.uuid4().hex[:8]
    input_dir = comfy.base_dir / "input"
    write_png(input_dir / f"{tag}-top.png", 5, 3, (10, 20, 30))
    write_png(input_dir / f"{tag}-sub" / "nested.png", 4, 6, (200, 100, 0, 255))
    # A file in the output folder, made by the server itself: SaveImage of an EmptyImage.
    made = api.run(comfy, image_to_file(f"contract/{tag}-out", width=7, height=2))
    (out,) = made.history["outputs"]["2"]["images"]
    color = made.history["prompt"][2]["1"]["inputs"]["color"]
    out_rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    out_path = comfy.output_dir / out["subfolder"] / out["filename"]
    cases = {
        f"{tag}-top.png": (5, 3, (10, 20, 30)),
        f"{tag}-top.png [input]": (5, 3, (10, 20, 30)),
        # Not in the combo list (subfolders are not listed), yet accepted: VALIDATE_INPUTS
        # takes the input, so ComfyUI only checks that the file exists.
        f"{tag}-sub/nested.png": (4, 6, (200, 100, 0)),
        f"{out['subfolder']}/{out['filename']} [output]": (7, 2, out_rgb),
        # An absolute path is used as it is, outside the input folder too: ComfyUI does not
        # confine LoadImage, so whoever submits prompts must.
        str(out_path): (7, 2, out_rgb),
    }
    for i, (name, expected) in enumerate(cases.items()):
        run = api.run(comfy, load_and_save(name, f"contract/{tag}-load{i}"))
        assert saved_image(comfy, run) == expected, name


def test_load_image_of_a_missing_file_fails_validation(comfy, api):
    tag = uuid.uuid4().hex[:8]
    for name in (
        f"{tag}-missing.png",
        f"{tag}-missing.png [output]",
        str(comfy.base_dir / f"{tag}-absent.png"),
    ):
        run = api.run(comfy, load_and_save(name, f"contract/{tag}"))
        assert run.status == 400
        assert run.response == {
            "error": {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                # Only the output node's own errors are listed here, and SaveImage has none.
                "details": "",
                "extra_info": {},
            },
            "node_errors": {
                "1": {
                    "errors": [
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": f"image - Invalid image file: {name}",
                            "extra_info": {"input_name": "image"},
                        }
                    ],
                    "dependent_outputs": ["2"],
                    "class_type": "LoadImage",
                }
            },
        }

    # LoadImageMask's channel is still checked against its list; its image only for existence.
    mask = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "absent.png", "channel": "cyan"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    run = api.run(comfy, mask)
    assert run.status == 400
    errors = sorted(run.response["node_errors"]["1"]["errors"], key=lambda e: e["type"])
    assert [(e["type"], e["details"]) for e in errors] == [
        ("custom_validation_failed", "image - Invalid image file: absent.png"),
        ("value_not_in_list", "channel: 'cyan' not in ['alpha', 'red', 'green', 'blue']"),
    ]


def test_load_image_of_an_unreadable_file_is_an_execution_error(comfy, api):
    tag = uuid.uuid4().hex[:8]
    bad = comfy.base_dir / "input" / f"{tag}-bad.png"
    bad.write_bytes(b"not an image at all")
    run = api.run(comfy, load_and_save(bad.name, f"contract/{tag}"))
    assert run.status == 200 and run.response["node_errors"] == {}
    (error,) = run.of_type("execution_error")
    assert error["node_id"] == "1" and error["node_type"] == "LoadImage"
    assert error["exception_type"] == "PIL.UnidentifiedImageError"
    assert error["exception_message"] == f"cannot identify image file {str(bad)!r}\n"
    assert error["current_inputs"] == {"image": [bad.name]}


def test_load_image_runs_again_when_the_file_changes(comfy, api):
    tag = uuid.uuid4().hex[:8]
    path = write_png(comfy.base_dir / "input" / f"{tag}.png", 3, 3, (1, 2, 3))
    prompt = load_and_save(path.name, f"contract/{tag}")
    assert saved_image(comfy, api.run(comfy, prompt)) == (3, 3, (1, 2, 3))
    again = api.run(comfy, prompt)
    assert again.of_type("execution_cached")[0]["nodes"] == ["1", "2"]
    write_png(path, 2, 5, (4, 5, 6))  # IS_CHANGED hashes the file: a new one runs both nodes
    changed = api.run(comfy, prompt)
    assert changed.of_type("execution_cached")[0]["nodes"] == []
    assert saved_image(comfy, changed) == (2, 5, (4, 5, 6))


def test_load_image_mask_outputs_a_mask(comfy, api):
    tag = uuid.uuid4().hex[:8]
    path = write_png(comfy.base_dir / "input" / f"{tag}.png", 4, 4, (9, 8, 7, 128))
    for channel in ("alpha", "red"):
        prompt = {
            "1": {
                "class_type": "LoadImageMask",
                "inputs": {"image": path.name, "channel": channel},
            },
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        }
        run = api.run(comfy, prompt)
        assert run.status == 200 and run.history["status"]["status_str"] == "success"
    # A MASK is no IMAGE: neither LoadImageMask's output nor LoadImage's second one saves.
    for class_type, inputs, slot in (
        ("LoadImageMask", {"image": path.name, "channel": "alpha"}, 0),
        ("LoadImage", {"image": path.name}, 1),
    ):
        prompt = load_and_save(path.name, f"contract/{tag}")
        prompt["1"] = {"class_type": class_type, "inputs": inputs}
        prompt["2"]["inputs"]["images"] = ["1", slot]
        run = api.run(comfy, prompt)
        assert run.status == 400
        (error,) = run.response["node_errors"]["2"]["errors"]
        assert error["type"] == "return_type_mismatch"
        assert error["details"] == "images, received_type(MASK) mismatch input_type(IMAGE)"


def test_object_info_of_load_image_nodes(comfy, api):
    tag = uuid.uuid4().hex[:8]
    input_dir = comfy.base_dir / "input"
    for name in (f"{tag}-b.png", f"{tag}-a.webp", f"{tag}-notes.txt", f"{tag}-dir/c.png"):
        (input_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (input_dir / name).write_bytes(b"x")
    status, info = api.call(comfy, "GET", "/object_info/LoadImage")
    assert status == 200
    load = info["LoadImage"]
    files, options = load["input"]["required"]["image"]
    assert options == {"image_upload": True}
    assert files == sorted(files)
    mine = [f for f in files if f.startswith(tag)]
    assert mine == [f"{tag}-a.webp", f"{tag}-b.png"]  # image types only, no subfolders
    assert {k: v for k, v in load.items() if k != "input"} == {
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"],
        "output_is_list": [False, False],
        "output_name": ["IMAGE", "MASK"],
        "name": "LoadImage",
        "display_name": "Load Image",
        "description": "",
        "python_module": "nodes",
        "category": "image",
        "output_node": False,
        "search_aliases": [
            "load image",
            "open image",
            "import image",
            "image input",
            "upload image",
            "read image",
            "image loader",
        ],
    }
    mask = api.call(comfy, "GET", "/object_info/LoadImageMask")[1]["LoadImageMask"]
    files, options = mask["input"]["required"]["image"]
    assert options == {"image_upload": True}
    assert [f for f in files if f.startswith(tag)] == [
        f"{tag}-a.webp",
        f"{tag}-b.png",
        f"{tag}-notes.txt",  # LoadImageMask lists every file
    ]
    assert mask["input"]["required"]["channel"] == [["alpha", "red", "green", "blue"]]
    assert (mask["output"], mask["category"], mask["display_name"]) == (
        ["MASK"],
        "mask",
        "Load Image (as Mask)",
    )
