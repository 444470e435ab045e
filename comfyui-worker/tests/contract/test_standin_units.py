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


def make_png(
    width: int,
    height: int,
    depth: int,
    color_type: int,
    raw: bytes,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    interlace: int = 0,
) -> bytes:
    """A PNG from its decompressed scanlines (filter bytes included) and extra chunks."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    data = zlib.compress(raw)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + b"".join(chunk(kind, body) for kind, body in extra)
        # IDAT split in two, as encoders may do
        + chunk(b"IDAT", data[:3])
        + chunk(b"IDAT", data[3:])
        + chunk(b"IEND", b"")
    )


def test_png_reader_takes_size_and_first_pixel(standin_module):
    decode = standin_module.decode_png

    def seen(data: bytes) -> tuple:
        info = decode(data)
        return (info.width, info.height, info.rgb, info.alpha, info.alpha_band)

    assert seen(standin_module.encode_png(5, 3, (1, 2, 3), {"prompt": "{}"})) == (
        5,
        3,
        (1, 2, 3),
        255,
        False,
    )
    # RGBA, first row Paeth-filtered, second Up-filtered: the first pixel is stored as is.
    rgba = b"\x04" + bytes([9, 8, 7, 100]) + bytes(4) + b"\x02" + bytes(8)
    assert seen(make_png(2, 2, 8, 6, rgba)) == (2, 2, (9, 8, 7), 100, True)
    # Grey+alpha; grey 16-bit (Pillow clips to 255); RGB 16-bit (high bytes).
    assert seen(make_png(1, 1, 8, 4, b"\x00\x50\x10")) == (1, 1, (80, 80, 80), 16, True)
    assert seen(make_png(1, 1, 16, 0, b"\x00\x01\x00")) == (1, 1, (255,) * 3, 255, False)
    rgb16 = b"\x00" + struct.pack(">HHH", 0x1234, 0xFF00, 0x0001)
    assert seen(make_png(1, 1, 16, 2, rgb16)) == (1, 1, (0x12, 0xFF, 0), 255, False)
    # A palette of 4 bits with tRNS: index 1 in the high nibble; transparency gives an A band.
    plte = (b"PLTE", bytes([0, 0, 0, 40, 50, 60])), (b"tRNS", b"\xff\x20")
    assert seen(make_png(2, 1, 4, 3, b"\x00\x10", plte)) == (2, 1, (40, 50, 60), 0x20, True)
    # 2-bit grey is scaled to 8 bits; an RGB colour key gives alpha 0 but no A band.
    assert seen(make_png(4, 1, 2, 0, b"\x00\x80")) == (4, 1, (170, 170, 170), 255, False)
    key = ((b"tRNS", struct.pack(">HHH", 1, 2, 3)),)
    assert seen(make_png(1, 1, 8, 2, b"\x00\x01\x02\x03", key)) == (1, 1, (1, 2, 3), 0, False)
    # Interlaced (Adam7): the first pass starts at the first pixel; a 1x1 image has only it.
    assert seen(make_png(1, 1, 8, 2, b"\x00\x05\x06\x07", interlace=1))[2] == (5, 6, 7)

    for bad in (
        b"GIF89a...",
        b"\x89PNG\r\n\x1a\n",  # no chunks
        make_png(1, 1, 8, 2, b"\x00\x01"),  # a pixel short
        make_png(1, 1, 8, 5, b"\x00\x01"),  # no such colour type
        make_png(1, 1, 8, 3, b"\x00\x05", ((b"PLTE", bytes(3)),)),  # index past the palette
    ):
        assert decode(bad) is None, bad


def test_unreadable_image_raises_like_pillow(standin_module, tmp_path):
    path = tmp_path / "input" / "x.png"
    path.parent.mkdir()
    path.write_bytes(b"JFIF, not handled")
    with pytest.raises(OSError) as raised:
        standin_module.read_image(str(path))
    assert standin_module.full_type_name(raised.type) == "PIL.UnidentifiedImageError"
    assert str(raised.value) == f"cannot identify image file {str(path)!r}"
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        standin_module.read_image(str(tmp_path / "absent.png"))


def test_annotated_file_names(standin_module, tmp_path):
    folders = standin_module.Folders(str(tmp_path))
    inp, out, temp = folders.input_dir, folders.output_dir, folders.temp_dir
    path = folders.get_annotated_filepath
    assert path("a.png") == f"{inp}/a.png"
    assert path("sub/a.png") == f"{inp}/sub/a.png"
    assert path("a.png [input]") == f"{inp}/a.png"
    assert path("sub/a.png [output]") == f"{out}/sub/a.png"
    assert path("a.png [temp]") == f"{temp}/a.png"
    assert path("a.png", default_dir=out) == f"{out}/a.png"
    # ComfyUI cuts the annotation and the character before it, and confines nothing.
    assert path("a.png[output]") == f"{out}/a.pn"
    assert path("/etc/hostname") == "/etc/hostname"
    assert path("/etc/hostname [output]") == "/etc/hostname"
    assert path("../x.png") == f"{inp}/../x.png"
    with pytest.raises(AttributeError):
        path(5)  # type: ignore[arg-type]

    Path(out, "sub").mkdir(parents=True)
    Path(out, "sub", "a.png").write_bytes(b"")
    assert folders.exists_annotated_filepath("sub/a.png [output]")
    assert not folders.exists_annotated_filepath("sub/a.png")
    assert folders.exists_annotated_filepath(out)  # a folder exists too


def test_input_file_listing(standin_module, tmp_path):
    folders = standin_module.Folders(str(tmp_path))
    Path(folders.input_dir, "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "c.webp", "d.txt", "noext", ".e.png", "sub/f.png"):
        Path(folders.input_dir, name).write_bytes(b"")
    assert folders.input_files(["image"]) == [".e.png", "a.JPG", "b.png", "c.webp"]
    assert folders.input_files() == [".e.png", "a.JPG", "b.png", "c.webp", "d.txt", "noext"]
