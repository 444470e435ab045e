"""The stand-in's own helpers: its YAML subset, PNG writer, file naming and run order."""

from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parent.parent / "comfyui_standin" / "main.py"


@pytest.fixture(scope="module")
def standin_module():
    spec = importlib.util.spec_from_file_location("comfyui_standin_main", MAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extra_model_paths_subset(standin_module, tmp_path):
    text = """
#comment
comfyui:
     base_path: /models/base/
     # a comment
     is_default: true
     checkpoints: models/checkpoints/  # trailing comment
     text_encoders: |
          models/text_encoders/
          models/clip/
     vae: "models/vae"
other:
empty_after:
     loras: /abs/loras
"""
    config = standin_module.parse_extra_model_paths(text)
    assert config == {
        "comfyui": {
            "base_path": "/models/base/",
            "is_default": True,
            "checkpoints": "models/checkpoints/",
            "text_encoders": "models/text_encoders/\nmodels/clip/\n",
            "vae": "models/vae",
        },
        "other": None,
        "empty_after": {"loras": "/abs/loras"},
    }
    (tmp_path / "cfg.yaml").write_text(text)
    folders = standin_module.Folders(str(tmp_path / "comfy"))
    folders.load_extra_model_paths(str(tmp_path / "cfg.yaml"))
    assert folders.model_paths["checkpoints"][0] == "/models/base/models/checkpoints"
    assert folders.model_paths["text_encoders"][:2] == [
        "/models/base/models/clip",
        "/models/base/models/text_encoders",
    ]
    assert folders.model_paths["loras"][-1] == "/abs/loras"


def test_model_file_listing(standin_module, tmp_path):
    folders = standin_module.Folders(str(tmp_path))
    ckpts = tmp_path / "models" / "checkpoints"
    (ckpts / "sub").mkdir(parents=True)
    for name in ("b.safetensors", "a.ckpt", "notes.txt", "sub/c.sft"):
        (ckpts / name).write_bytes(b"x")
    assert folders.get_filename_list("checkpoints") == ["a.ckpt", "b.safetensors", "sub/c.sft"]
    assert folders.get_full_path("checkpoints", "sub/c.sft") == str(ckpts / "sub" / "c.sft")
    assert folders.get_full_path("checkpoints", "../../etc/passwd") is None


def test_png_is_valid(standin_module):
    data = standin_module.encode_png(3, 2, (255, 0, 16), {"prompt": "{}"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        pos += 12 + length
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (3, 2, 8, 2, 0, 0, 0)
    assert chunks[b"tEXt"] == b"prompt\x00{}"
    assert zlib.decompress(chunks[b"IDAT"]) == (b"\x00" + b"\xff\x00\x10" * 3) * 2
    assert b"IEND" in chunks


def test_save_image_counter_and_subfolders(standin_module, tmp_path):
    folders = standin_module.Folders(str(tmp_path))
    out = str(tmp_path / "out")
    folder, name, counter, sub = folders.save_image_path("jobs/u1/img", out, 8, 8)
    assert (Path(folder), name, counter, sub) == (
        tmp_path / "out" / "jobs" / "u1",
        "img",
        1,
        "jobs/u1",
    )
    for existing in ("img_00007_.png", "img_00002_.png", "img2_00050_.png", "other.png"):
        (Path(folder) / existing).write_bytes(b"")
    assert folders.save_image_path("jobs/u1/img", out, 8, 8)[2] == 8
    with pytest.raises(Exception, match="outside the output folder"):
        folders.save_image_path("../escape", out, 8, 8)


def test_run_order_prefers_outputs(standin_module):
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    prompt = {
        "1": node("EmptyImage", width=8, height=8, batch_size=1, color=0),
        "2": node("StandInSleep", seconds=0, steps=1, images=["1", 0]),
        "3": node("SaveImage", images=["2", 0], filename_prefix="a"),
        "4": node("PreviewAny", source="text"),
        "5": node("SaveImage", images=["1", 0], filename_prefix="b"),
    }
    order = list(standin_module.ExecutionList(prompt, ["3", "4", "5"], set()))
    assert order == ["4", "1", "5", "2", "3"]
    # Cached ancestors are not run; a cached output still is (it replays its UI).
    assert list(standin_module.ExecutionList(prompt, ["5"], {"1", "5"})) == ["5"]
