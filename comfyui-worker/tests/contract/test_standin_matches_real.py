"""Side by side: the same prompts on the real ComfyUI and on the stand-in give the same answers.

Runs only when a real ComfyUI is set up (COMFYUI_SOURCE). Event streams, history entries, error
bodies and node schemas are compared whole, after ids, timestamps and tracebacks are blanked.
"""

from __future__ import annotations

import copy
import re
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.comfyui_real]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
NODES_IN_BOTH = (
    "EmptyImage",
    "SaveImage",
    "PreviewAny",
    "CheckpointLoaderSimple",
    "LoadImage",
    "LoadImageMask",
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, start_comfy):
    real = start_comfy("real", tmp_path_factory.mktemp("pair-real"))
    try:
        standin = start_comfy("standin", tmp_path_factory.mktemp("pair-standin"))
    except Exception:
        real.stop()
        raise
    yield real, standin
    standin.stop()
    real.stop()


def normalize(value: Any, base_dirs: tuple[Path, ...] = ()) -> Any:
    """Blanks what differs between two runs: ids, times, tracebacks, paths of the servers."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            key = normalize(key, base_dirs)
            if key in ("timestamp", "create_time", "execution_start_time", "execution_end_time"):
                out[key] = "<time>"
            elif key == "traceback":
                out[key] = "<traceback>"
            elif key == "current_inputs":
                out[key] = sorted(item)  # values are str() of torch tensors on the real one
            elif key in ("errors", "current_outputs") and isinstance(item, list):
                # ComfyUI builds these from sets: their order varies from run to run.
                out[key] = sorted(normalize(item, base_dirs), key=repr)
            else:
                out[key] = normalize(item, base_dirs)
        return out
    if isinstance(value, (list, tuple)):
        return [normalize(v, base_dirs) for v in value]
    if isinstance(value, str):
        for base in base_dirs:
            value = value.replace(str(base), "<base>")
        return UUID.sub("<id>", value)
    return value


def both(pair, api, prompt: dict[str, Any], **kwargs: Any):
    real, standin = pair
    return api.run(real, copy.deepcopy(prompt), **kwargs), api.run(
        standin, copy.deepcopy(prompt), **kwargs
    )


def assert_same_run(pair, real_run, standin_run) -> None:
    dirs = (pair[0].base_dir, pair[1].base_dir)
    assert real_run.status == standin_run.status
    assert normalize(standin_run.response, dirs) == normalize(real_run.response, dirs)
    assert normalize(standin_run.messages, dirs) == normalize(real_run.messages, dirs)
    assert normalize(standin_run.history, dirs) == normalize(real_run.history, dirs)


def image_to_file(prefix: str, batch: int = 1) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 12, "batch_size": batch, "color": 0xFF8000},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_save_image_then_cached_rerun(pair, api):
    prompt = image_to_file(f"pair/{uuid.uuid4().hex[:8]}", batch=2)
    assert_same_run(pair, *both(pair, api, prompt))
    assert_same_run(pair, *both(pair, api, prompt))
    real, standin = pair
    real_files = sorted(p.name for p in (real.output_dir / "pair").iterdir())
    assert real_files == sorted(p.name for p in (standin.output_dir / "pair").iterdir())


def test_validation_failures(pair, api):
    bad = image_to_file("pair/bad")
    bad["1"]["inputs"].update({"width": 0, "batch_size": "many"})
    del bad["1"]["inputs"]["height"]
    bad["2"]["inputs"]["filename_prefix"] = 7
    missing_ckpt = {
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.ckpt"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    mismatch = image_to_file("pair/mismatch")
    mismatch["3"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}}
    mismatch["2"]["inputs"]["images"] = ["3", 2]
    for prompt in (
        bad,
        missing_ckpt,
        mismatch,
        {"1": {"class_type": "Nope", "inputs": {}}},
        {"1": {"inputs": {}}},
        {"1": image_to_file("x")["1"]},
    ):
        assert_same_run(pair, *both(pair, api, prompt))


def test_partial_failure_and_text_output(pair, api):
    prompt = image_to_file(f"pair/{uuid.uuid4().hex[:8]}")
    prompt["3"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.ckpt"}}
    prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    # Only one output is ready at the start besides EmptyImage: ComfyUI runs ready outputs first,
    # in an order that varies between runs when there are several.
    prompt["5"] = {"class_type": "PreviewAny", "inputs": {"source": 42}}
    assert_same_run(pair, *both(pair, api, prompt))


def test_node_errors_and_oom(pair, api):
    for class_type, inputs in (
        ("StandInRaise", {"message": "boom", "exception": "FileNotFoundError"}),
        ("StandInOutOfMemory", {"allocate_mib": 64.0}),
    ):
        prompt = image_to_file(f"pair/{uuid.uuid4().hex[:8]}")
        prompt["3"] = {"class_type": class_type, "inputs": {**inputs, "images": ["1", 0]}}
        prompt["2"]["inputs"]["images"] = ["3", 0]
        real_run, standin_run = both(pair, api, prompt)
        for run in (real_run, standin_run):
            for _, data in run.messages + run.history["status"]["messages"]:
                if "exception_message" in data:  # the stand-in's OOM text is longer
                    data["exception_message"] = data["exception_message"].split(".")[0]
        assert_same_run(pair, real_run, standin_run)


def test_interrupt_event_stream(pair, api):
    async def interrupt_at_first_progress(session, kind, data, prompt_id):
        if kind == "progress" and data["value"] == 1:
            async with session.post(f"{session_url[0]}/interrupt", json={"prompt_id": prompt_id}):
                pass

    prompt = image_to_file(f"pair/{uuid.uuid4().hex[:8]}")
    prompt["3"] = {
        "class_type": "StandInSleep",
        "inputs": {"seconds": 10.0, "steps": 100, "images": ["1", 0]},
    }
    prompt["2"]["inputs"]["images"] = ["3", 0]
    runs = []
    for server in pair:
        session_url = [server.url]
        runs.append(api.run(server, copy.deepcopy(prompt), on_message=interrupt_at_first_progress))
    assert_same_run(pair, *runs)


def solid_png(width: int, height: int, rgba: tuple[int, ...]) -> bytes:
    """An 8-bit RGB (three values) or RGBA (four) PNG of one colour."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if len(rgba) == 4 else 2, 0, 0, 0)
    rows = (b"\x00" + bytes(rgba) * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def put_inputs(pair, files: dict[str, bytes]) -> None:
    """The same files in both servers' input folders."""
    for server in pair:
        for name, data in files.items():
            path = server.base_dir / "input" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def test_load_image_runs_and_failures(pair, api):
    tag = uuid.uuid4().hex[:8]
    put_inputs(
        pair,
        {
            f"{tag}.png": solid_png(6, 4, (250, 128, 3, 200)),
            f"{tag}-sub/rgb.png": solid_png(3, 5, (1, 2, 3)),
            f"{tag}-bad.png": b"not an image",
        },
    )

    def load(name: str, class_type: str = "LoadImage", slot: int = 0) -> dict[str, Any]:
        inputs: dict[str, Any] = {"image": name}
        if class_type == "LoadImageMask":
            inputs["channel"] = "alpha"
        return {
            "1": {"class_type": class_type, "inputs": inputs},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", slot], "filename_prefix": f"pair/{tag}"},
            },
        }

    ran = load(f"{tag}.png [input]")
    for prompt in (
        ran,
        ran,  # from cache: the file did not change
        load(f"{tag}-sub/rgb.png"),
        load(f"{tag}-missing.png"),
        load(f"{tag}-missing.png [output]"),
        load(f"{tag}-bad.png"),
        load(f"{tag}.png", slot=1),
        load(f"{tag}.png", "LoadImageMask"),
        {"1": {"class_type": "LoadImage", "inputs": {}}, **{"2": load("x")["2"]}},
    ):
        assert_same_run(pair, *both(pair, api, prompt))
    real, standin = pair
    real_files = sorted(p.name for p in (real.output_dir / "pair").iterdir())
    assert real_files == sorted(p.name for p in (standin.output_dir / "pair").iterdir())


def test_object_info_of_shared_nodes(pair, api):
    real, standin = pair
    # LoadImage lists the image files directly in the input folder; LoadImageMask every file.
    put_inputs(
        pair,
        {name: b"x" for name in ("b.png", "a.JPG", "c.webp", "d.txt", ".e.png", "sub/f.png")},
    )
    real_info = api.call(real, "GET", "/object_info")[1]
    standin_info = api.call(standin, "GET", "/object_info")[1]
    for name in NODES_IN_BOTH:
        assert standin_info[name] == real_info[name], name


def test_system_stats_shape(pair, api):
    real, standin = pair
    real_stats = api.call(real, "GET", "/system_stats")[1]
    standin_stats = api.call(standin, "GET", "/system_stats")[1]
    assert standin_stats.keys() == real_stats.keys()
    assert standin_stats["system"].keys() == real_stats["system"].keys()
    assert standin_stats["devices"][0].keys() == real_stats["devices"][0].keys()
    for key in ("name", "type", "index"):
        assert standin_stats["devices"][0][key] == real_stats["devices"][0][key]
    assert standin_stats["system"]["comfyui_version"] == real_stats["system"]["comfyui_version"]


def test_queue_and_jobs_shapes(pair, api):
    prompt = image_to_file(f"pair/{uuid.uuid4().hex[:8]}")
    real_run, standin_run = both(pair, api, prompt)
    dirs = (pair[0].base_dir, pair[1].base_dir)
    for path in ("/api/jobs/{}", "/api/jobs?limit=2", "/queue", "/prompt", "/history/{}"):
        real_answer = api.call(pair[0], "GET", path.format(real_run.prompt_id))
        standin_answer = api.call(pair[1], "GET", path.format(standin_run.prompt_id))
        assert normalize(standin_answer, dirs) == normalize(real_answer, dirs), path
