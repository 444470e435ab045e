"""A stand-in for ComfyUI v0.11.0's HTTP and websocket API, for tests and benchmarks.

It is started like ComfyUI (``python main.py --listen 127.0.0.1 --port 8188 --output-directory D``)
and answers the routes a ComfyUI client uses with ComfyUI's JSON shapes and message order, so the
worker can be tested without torch, a GPU or model weights. Only aiohttp is needed; PNG files are
written and read with zlib and struct. It runs a few of ComfyUI's own nodes (EmptyImage, LoadImage,
LoadImageMask, SaveImage, PreviewAny, CheckpointLoaderSimple) and test-only nodes prefixed
``StandIn`` that sleep, fail, run out of "GPU memory", hang or drop websockets; README.md lists
them.

Behaviour mirrors ComfyUI's server.py, execution.py and main.py at the v0.11.0 release: one
execution thread takes prompts from a priority queue, sends events through one ordered publish
loop, caches node outputs by input signature (an identical prompt runs from cache), writes history
before the final ``executing`` with ``node: null``, and checks interrupts between nodes and steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import heapq
import inspect
import itertools
import json
import logging
import mimetypes
import os
import signal
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from aiohttp import WSMsgType, web

COMFYUI_VERSION = "0.11.0"
MAX_RESOLUTION = 16384
MAXIMUM_HISTORY_SIZE = 10000
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MIB = 1024 * 1024

log = logging.getLogger("comfyui-standin")


# --------------------------------------------------------------------------------------------
# Command line (ComfyUI's flags that matter here; every other flag is accepted and ignored)
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ComfyUI v0.11.0 stand-in for tests")
    parser.add_argument("--listen", default="127.0.0.1", nargs="?", const="0.0.0.0,::")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", default=None)
    parser.add_argument(
        "--extra-model-paths-config", default=None, nargs="+", action="append", metavar="PATH"
    )
    parser.add_argument("--output-directory", default=None)
    parser.add_argument("--input-directory", default=None)
    parser.add_argument("--temp-directory", default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--cache-none", action="store_true")
    parser.add_argument("--disable-metadata", action="store_true")
    parser.add_argument("--max-upload-size", type=float, default=100)
    parser.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?")
    parser.add_argument("--log-stdout", action="store_true")
    parser.add_argument(
        "--standin-startup-delay",
        type=float,
        default=float(os.environ.get("COMFYUI_STANDIN_STARTUP_DELAY", "0") or 0),
        help="seconds to wait before opening the port, like a slow model load (default 0)",
    )
    args, unknown = parser.parse_known_args(argv)
    args.ignored_flags = unknown
    return args


# --------------------------------------------------------------------------------------------
# Folders and model paths (folder_paths.py and utils/extra_config.py)
# --------------------------------------------------------------------------------------------

DEFAULT_MODEL_FOLDERS: dict[str, list[str]] = {
    "checkpoints": ["checkpoints"],
    "configs": ["configs"],
    "loras": ["loras"],
    "vae": ["vae"],
    "text_encoders": ["text_encoders", "clip"],
    "diffusion_models": ["unet", "diffusion_models"],
    "clip_vision": ["clip_vision"],
    "style_models": ["style_models"],
    "embeddings": ["embeddings"],
    "vae_approx": ["vae_approx"],
    "controlnet": ["controlnet", "t2i_adapter"],
    "gligen": ["gligen"],
    "upscale_models": ["upscale_models"],
    "latent_upscale_models": ["latent_upscale_models"],
    "hypernetworks": ["hypernetworks"],
    "photomaker": ["photomaker"],
    "classifiers": ["classifiers"],
    "model_patches": ["model_patches"],
    "audio_encoders": ["audio_encoders"],
}
# ComfyUI keeps "clip" and "unet" as aliases of the newer folder names.
LEGACY_FOLDER_NAMES = {"clip": "text_encoders", "unet": "diffusion_models"}


def _yaml_scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    if text.lower() in ("true", "yes", "on"):
        return True
    if text.lower() in ("false", "no", "off"):
        return False
    if text in ("", "~", "null"):
        return None
    return text


def parse_extra_model_paths(text: str) -> dict[str, dict[str, Any] | None]:
    """Parses the subset of YAML that extra_model_paths.yaml uses (no PyYAML here).

    Sections of ``key: value`` pairs, where a value may be a ``|`` block of one path per line.
    """
    config: dict[str, dict[str, Any] | None] = {}
    section: dict[str, Any] | None = None
    block_key: str | None = None
    block_lines: list[str] = []
    block_indent: int | None = None
    key_indent: int | None = None

    def close_block() -> None:
        nonlocal block_key, block_lines, block_indent
        if section is not None and block_key is not None:
            section[block_key] = "".join(line + "\n" for line in block_lines)
        block_key, block_lines, block_indent = None, [], None

    for raw in text.splitlines():
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip(" "))
        if block_key is not None:
            if not stripped:
                continue
            if block_indent is None and indent > (key_indent or 0):
                block_indent = indent
            if block_indent is not None and indent >= block_indent:
                block_lines.append(raw[block_indent:].rstrip())
                continue
            close_block()
        if not stripped or stripped.startswith("#"):
            continue
        if ":" not in stripped:
            raise ValueError(f"cannot parse line in extra model paths config: {raw!r}")
        key, _, value = stripped.partition(":")
        key = key.strip().strip("'\"")
        if indent == 0:
            section = None
            config[key] = None
            if _yaml_scalar(value) is not None:
                raise ValueError(f"section {key!r} must hold key: value pairs")
            continue
        last = list(config)[-1] if config else None
        if last is None:
            raise ValueError(f"indented line before any section: {raw!r}")
        if config[last] is None:
            config[last] = {}
        section = config[last]
        value = value.strip()
        if value.startswith("|") or value.startswith(">"):
            block_key, key_indent = key, indent
            continue
        section[key] = _yaml_scalar(value)
    close_block()
    return config


# folder_paths.extension_mimetypes_cache: filled as extensions are met, keyed by the text after
# the last dot, so the first file with an extension decides for all files with it.
EXTENSION_CONTENT_TYPES: dict[str, str] = {"webp": "image", "fbx": "model"}


def filter_files_content_types(files: list[str], content_types: list[str]) -> list[str]:
    """folder_paths.filter_files_content_types: keeps files whose MIME type's first part (image,
    video, audio, model) is one of content_types; files without a known type are dropped."""
    result = []
    for file in files:
        extension = file.split(".")[-1]
        if extension not in EXTENSION_CONTENT_TYPES:
            mime_type, _ = mimetypes.guess_type(file, strict=False)
            if not mime_type:
                continue
            EXTENSION_CONTENT_TYPES[extension] = mime_type.split("/")[0]
        if EXTENSION_CONTENT_TYPES[extension] in content_types:
            result.append(file)
    return result


class Folders:
    """Where ComfyUI reads models and inputs from and writes outputs to."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.output_dir = os.path.join(self.base_dir, "output")
        self.input_dir = os.path.join(self.base_dir, "input")
        self.temp_dir = os.path.join(self.base_dir, "temp")
        models_dir = os.path.join(self.base_dir, "models")
        self.model_paths: dict[str, list[str]] = {
            name: [os.path.join(models_dir, sub) for sub in subs]
            for name, subs in DEFAULT_MODEL_FOLDERS.items()
        }

    def add_model_folder_path(self, name: str, path: str, is_default: bool = False) -> None:
        name = LEGACY_FOLDER_NAMES.get(name, name)
        paths = self.model_paths.setdefault(name, [])
        if path in paths:
            if is_default:
                paths.remove(path)
                paths.insert(0, path)
            return
        if is_default:
            paths.insert(0, path)
        else:
            paths.append(path)

    def load_extra_model_paths(self, yaml_path: str) -> None:
        with open(yaml_path, encoding="utf-8") as stream:
            config = parse_extra_model_paths(stream.read())
        yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
        for conf in config.values():
            if conf is None:
                continue
            conf = dict(conf)
            base_path = conf.pop("base_path", None)
            if base_path:
                base_path = os.path.expandvars(os.path.expanduser(str(base_path)))
                if not os.path.isabs(base_path):
                    base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
            is_default = bool(conf.pop("is_default", False))
            for name, value in conf.items():
                for line in str(value or "").split("\n"):
                    if not line:
                        continue
                    if base_path:
                        full = os.path.join(base_path, line)
                    elif not os.path.isabs(line):
                        full = os.path.abspath(os.path.join(yaml_dir, line))
                    else:
                        full = line
                    full = os.path.normpath(full)
                    log.info("Adding extra search path %s %s", name, full)
                    self.add_model_folder_path(name, full, is_default)

    def get_filename_list(self, name: str) -> list[str]:
        found: set[str] = set()
        for root_dir in self.model_paths.get(LEGACY_FOLDER_NAMES.get(name, name), []):
            if not os.path.isdir(root_dir):
                continue
            for dirpath, dirnames, filenames in os.walk(root_dir, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for filename in filenames:
                    if os.path.splitext(filename)[1].lower() not in SUPPORTED_PT_EXTENSIONS:
                        continue
                    rel = os.path.relpath(os.path.join(dirpath, filename), root_dir)
                    found.add(rel.replace(os.sep, "/"))
        return sorted(found)

    def get_full_path(self, name: str, filename: str) -> str | None:
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root_dir in self.model_paths.get(LEGACY_FOLDER_NAMES.get(name, name), []):
            full = os.path.join(root_dir, filename)
            if os.path.isfile(full):
                return full
        return None

    # folder_paths.annotated_filepath and friends, as LoadImage and LoadImageMask use them. A name
    # is joined to its folder as it is: "sub/x.png" reaches a subfolder, "../x" and an absolute
    # path reach anywhere (os.path.join drops the folder before an absolute path).
    def annotated_filepath(self, name: str) -> tuple[str, str | None]:
        """``x.png [output]`` -> ("x.png", output folder); the suffix and one character before it
        are cut. Names without an annotation have no folder of their own."""
        for suffix, base_dir in (
            ("[output]", self.output_dir),
            ("[input]", self.input_dir),
            ("[temp]", self.temp_dir),
        ):
            if name.endswith(suffix):
                return name[: -len(suffix) - 1], base_dir
        return name, None

    def get_annotated_filepath(self, name: str, default_dir: str | None = None) -> str:
        name, base_dir = self.annotated_filepath(name)
        if base_dir is None:
            base_dir = default_dir if default_dir is not None else self.input_dir
        return os.path.join(base_dir, name)

    def exists_annotated_filepath(self, name: str) -> bool:
        name, base_dir = self.annotated_filepath(name)
        return os.path.exists(os.path.join(base_dir or self.input_dir, name))

    def input_files(self, content_types: list[str] | None = None) -> list[str]:
        """The files directly in the input folder (no subfolders), sorted, as LoadImage lists
        them; with content_types only those whose MIME type is of one of those kinds."""
        files = [
            f for f in os.listdir(self.input_dir) if os.path.isfile(os.path.join(self.input_dir, f))
        ]
        if content_types is not None:
            files = filter_files_content_types(files, content_types)
        return sorted(files)

    def directory_by_type(self, type_name: str) -> str | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(
            type_name
        )

    def save_image_path(
        self, filename_prefix: str, output_dir: str, width: int, height: int
    ) -> tuple[str, str, int, str]:
        """ComfyUI's naming: ``{prefix}_{counter:05}_.png`` in a subfolder taken from the prefix."""
        if "%" in filename_prefix:
            now = time.localtime()
            for var, value in (
                ("%width%", str(width)),
                ("%height%", str(height)),
                ("%year%", str(now.tm_year)),
                ("%month%", str(now.tm_mon).zfill(2)),
                ("%day%", str(now.tm_mday).zfill(2)),
                ("%hour%", str(now.tm_hour).zfill(2)),
                ("%minute%", str(now.tm_min).zfill(2)),
                ("%second%", str(now.tm_sec).zfill(2)),
            ):
                filename_prefix = filename_prefix.replace(var, value)
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
                f"\n         output_dir: {output_dir}"
            )
        prefix_len = len(filename)
        counters = []
        try:
            existing = os.listdir(full_output_folder)
        except FileNotFoundError:
            os.makedirs(full_output_folder, exist_ok=True)
            existing = []
        for name in existing:
            prefix = name[: prefix_len + 1]
            try:
                digits = int(name[prefix_len + 1 :].split("_")[0])
            except ValueError:
                digits = 0
            if os.path.normcase(prefix[:-1]) == os.path.normcase(filename) and prefix[-1:] == "_":
                counters.append(digits)
        counter = max(counters) + 1 if counters else 1
        return full_output_folder, filename, counter, subfolder


# --------------------------------------------------------------------------------------------
# Values that flow between nodes, and PNG writing
# --------------------------------------------------------------------------------------------


class ImageBatch:
    """A batch of solid-colour RGB images: what EmptyImage and LoadImage make, SaveImage writes."""

    def __init__(self, width: int, height: int, batch_size: int, color: int) -> None:
        self.width, self.height, self.batch_size, self.color = width, height, batch_size, color

    def __str__(self) -> str:
        return f"ImageBatch[{self.batch_size}, {self.height}, {self.width}, 3](color={self.color})"


class MaskBatch:
    """A batch of one-value masks: LoadImage's second output and LoadImageMask's only one."""

    def __init__(self, width: int, height: int, batch_size: int, value: float) -> None:
        self.width, self.height, self.batch_size, self.value = width, height, batch_size, value

    def __str__(self) -> str:
        return f"MaskBatch[{self.batch_size}, {self.height}, {self.width}](value={self.value:g})"


class LoadedModel:
    """A checkpoint that CheckpointLoaderSimple "loaded": it only occupies simulated VRAM."""

    def __init__(self, kind: str, name: str, size: int) -> None:
        self.kind, self.name, self.size = kind, name, size

    def __str__(self) -> str:
        return f"<{self.kind} {self.name}>"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(width: int, height: int, rgb: tuple[int, int, int], text: dict[str, str]) -> bytes:
    """An 8-bit RGB PNG of one colour, with tEXt chunks (ComfyUI stores the prompt there)."""
    row = b"\x00" + bytes(rgb) * width
    compressor = zlib.compressobj(4)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in text.items():
        chunks.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode()))
    chunks.append(_png_chunk(b"IDAT", b"".join(parts)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class PngInfo:
    """What LoadImage takes from a PNG: its size and its first pixel, as Pillow would see it.

    ``rgb`` and ``alpha`` are the pixel after conversion to RGBA (a tRNS colour key or palette
    entry gives the alpha); ``alpha_band`` tells whether Pillow's image has one (LA, RGBA, or a
    palette with transparency), which makes LoadImage's mask the image's size.
    """

    def __init__(
        self, width: int, height: int, rgb: tuple[int, int, int], alpha: int, alpha_band: bool
    ) -> None:
        self.width, self.height, self.rgb = width, height, rgb
        self.alpha, self.alpha_band = alpha, alpha_band


def decode_png(data: bytes) -> PngInfo | None:
    """Size and first pixel of a PNG of any colour type, bit depth or interlacing; None if the
    data is not a PNG this can read.

    Only the first pixel is decoded: under every filter type it is stored as is (no pixel lies
    left of or above it), and Adam7's first pass starts with it too. Samples of 16 bits give their
    high byte, except grey ones, which Pillow clips to 255.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, ihdr, palette, trns, idat = 8, b"", b"", None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tRNS":
            trns = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if len(ihdr) != 13 or not idat:
        return None
    width, height, depth, color_type = struct.unpack(">IIBB", ihdr[:10])
    channels = PNG_CHANNELS.get(color_type)
    if channels is None or not width or not height or depth not in (1, 2, 4, 8, 16):
        return None
    if (depth < 8 and color_type not in (0, 3)) or (depth == 16 and color_type == 3):
        return None
    need = 1 + (channels * depth + 7) // 8  # the filter byte and the first pixel
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), need)
    except zlib.error:
        return None
    if len(raw) < need:
        return None
    if depth == 16:
        samples = list(struct.unpack(f">{channels}H", raw[1:need]))
    elif depth == 8:
        samples = list(raw[1:need])
    else:
        samples = [raw[1] >> (8 - depth)]
    if trns is not None and color_type in (0, 2) and len(trns) == 2 * channels:
        alpha = 0 if list(struct.unpack(f">{channels}H", trns)) == samples else 255
    else:
        alpha = 255
    if color_type == 3:
        index = samples[0]
        if 3 * index + 3 > len(palette):
            return None
        if trns is not None and index < len(trns):
            alpha = trns[index]
        rgb = (palette[3 * index], palette[3 * index + 1], palette[3 * index + 2])
        return PngInfo(width, height, rgb, alpha, trns is not None)
    if depth == 16 and color_type == 0:
        samples = [min(samples[0], 255)]  # Pillow's "I;16" converts to RGB by clipping
    elif depth == 16:
        samples = [v >> 8 for v in samples]
    elif depth < 8:
        samples = [samples[0] * 255 // ((1 << depth) - 1)]
    if color_type in (4, 6):
        alpha = samples[-1]
    rgb = (samples[0], samples[1], samples[2]) if channels >= 3 else (samples[0],) * 3
    return PngInfo(width, height, rgb, alpha, color_type in (4, 6))


def read_image(path: str) -> PngInfo:
    """Opens an image file like LoadImage's Image.open: a missing file raises FileNotFoundError,
    one that cannot be read as an image PIL.UnidentifiedImageError."""
    with open(path, "rb") as fh:
        data = fh.read()
    info = decode_png(data)
    if info is None:
        raise UnidentifiedImageError(f"cannot identify image file {path!r}")
    return info


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class UnidentifiedImageError(OSError):
    """Pillow's error for a file it cannot read as an image (``PIL.UnidentifiedImageError``)."""


UnidentifiedImageError.__module__ = "PIL"


class InterruptProcessingException(Exception):
    pass


class OutOfMemoryError(RuntimeError):
    """Shaped like torch's CUDA OOM, so ``exception_type`` reads ``torch.OutOfMemoryError``."""


OutOfMemoryError.__module__ = "torch"

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size "
    "to a large number."
)


def full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class NodeContext:
    """What a running node may use: progress, interrupt checks, the server's simulated state."""

    def __init__(self, runtime: Runtime, prompt_id: str, node_id: str) -> None:
        self.runtime = runtime
        self.prompt_id = prompt_id
        self.node_id = node_id
        self._last_sent: float = -1
        self._last_time = 0.0

    def progress(self, value: float, total: float) -> None:
        """Like comfy.utils.ProgressBar.update_absolute, but checks for an interrupt every step.

        As in ComfyUI, the first and the final step are always reported and the others at most
        every 0.1 s and 0.5 % of the total.
        """
        self.runtime.throw_if_interrupted()
        value = min(value, total)
        now = time.perf_counter()
        if self._last_sent >= 0 and value < total:
            changed = (value - max(0, self._last_sent)) / total * 100 if total > 0 else 100
            if now - self._last_time < 0.1 or changed < 0.5:
                return
        self._last_time, self._last_sent = now, value
        self.runtime.progress_hook(value, total, self.prompt_id, self.node_id)

    def check_interrupt(self) -> None:
        self.runtime.throw_if_interrupted()


class Node:
    """A node class in ComfyUI's V1 shape (INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE, ...).

    A node may define ``VALIDATE_INPUTS(self, <inputs>)`` and ``IS_CHANGED(self, <inputs>)`` as
    ComfyUI's do (there as classmethods); they reach the folders through ``self.folders``.
    """

    display_name: str | None = None
    category = "sd"
    description = ""
    python_module = "nodes"
    output_node = False
    return_types: tuple[str, ...] = ()
    output_tooltips: tuple[str, ...] | None = None
    search_aliases: tuple[str, ...] = ()
    # ComfyUI re-runs a node whose IS_CHANGED returns NaN; these nodes behave that way.
    always_run = False

    def __init__(self, folders: Folders | None = None) -> None:
        self.folders = folders

    def input_types(self, folders: Folders) -> dict[str, dict[str, Any]]:
        return {"required": {}}

    def run(self, ctx: NodeContext, **inputs: Any) -> dict[str, Any]:
        """Returns {"result": tuple} and/or {"ui": dict}."""
        raise NotImplementedError


class EmptyImage(Node):
    category = "image"
    return_types = ("IMAGE",)

    def input_types(self, folders):
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
                ),
            }
        }

    def run(self, ctx, width, height, batch_size=1, color=0):
        return {"result": (ImageBatch(width, height, batch_size, color),)}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read())
    return digest.digest().hex()


class LoadImage(Node):
    """Reads an image named relative to the input folder, ``name [output]``/``[input]``/``[temp]``
    for another folder, or an absolute path, as ComfyUI does (nothing keeps it inside a folder)."""

    display_name = "Load Image"
    category = "image"
    return_types = ("IMAGE", "MASK")
    search_aliases = (
        "load image",
        "open image",
        "import image",
        "image input",
        "upload image",
        "read image",
        "image loader",
    )

    def input_types(self, folders):
        return {"required": {"image": (folders.input_files(["image"]), {"image_upload": True})}}

    def run(self, ctx, image):
        info = read_image(ctx.runtime.folders.get_annotated_filepath(image))
        color = (info.rgb[0] << 16) | (info.rgb[1] << 8) | info.rgb[2]
        if info.alpha_band:
            mask = MaskBatch(info.width, info.height, 1, 1.0 - info.alpha / 255.0)
        else:
            mask = MaskBatch(64, 64, 1, 0.0)
        return {"result": (ImageBatch(info.width, info.height, 1, color), mask)}

    def IS_CHANGED(self, image):
        return _file_sha256(self.folders.get_annotated_filepath(image))

    def VALIDATE_INPUTS(self, image):
        if not self.folders.exists_annotated_filepath(image):
            return f"Invalid image file: {image}"
        return True


class LoadImageMask(Node):
    """One channel of an image (alpha inverted) as a MASK; names resolve as for LoadImage."""

    display_name = "Load Image (as Mask)"
    category = "mask"
    return_types = ("MASK",)
    search_aliases = ("import mask", "alpha mask", "channel mask")
    color_channels = ("alpha", "red", "green", "blue")

    def input_types(self, folders):
        return {
            "required": {
                "image": (folders.input_files(), {"image_upload": True}),
                "channel": (list(self.color_channels),),
            }
        }

    def run(self, ctx, image, channel):
        info = read_image(ctx.runtime.folders.get_annotated_filepath(image))
        c = channel[0].upper()
        value = 1.0 - info.alpha / 255.0 if c == "A" else info.rgb["RGB".index(c)] / 255.0
        return {"result": (MaskBatch(info.width, info.height, 1, value),)}

    def IS_CHANGED(self, image, channel):
        return _file_sha256(self.folders.get_annotated_filepath(image))

    def VALIDATE_INPUTS(self, image):
        if not self.folders.exists_annotated_filepath(image):
            return f"Invalid image file: {image}"
        return True


class SaveImage(Node):
    display_name = "Save Image"
    category = "image"
    description = "Saves the input images to your ComfyUI output directory."
    output_node = True
    search_aliases = (
        "save",
        "save image",
        "export image",
        "output image",
        "write image",
        "download",
    )

    def input_types(self, folders):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "The prefix for the file to save. This may include formatting "
                        "information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to "
                        "include values from nodes.",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def run(self, ctx, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        folders = ctx.runtime.folders
        output_dir = folders.output_dir
        folder, filename, counter, subfolder = folders.save_image_path(
            filename_prefix, output_dir, images.width, images.height
        )
        text: dict[str, str] = {}
        if not ctx.runtime.args.disable_metadata:
            if prompt is not None:
                text["prompt"] = json.dumps(prompt)
            for key, value in (extra_pnginfo or {}).items():
                text[key] = json.dumps(value)
        rgb = ((images.color >> 16) & 0xFF, (images.color >> 8) & 0xFF, images.color & 0xFF)
        png = encode_png(images.width, images.height, rgb, text)
        results = []
        for batch_number in range(images.batch_size):
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            with open(os.path.join(folder, file), "wb") as fh:
                fh.write(png)
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}


class PreviewAny(Node):
    display_name = "Preview as Text"
    category = "utils"
    python_module = "comfy_extras.nodes_preview_any"
    output_node = True
    search_aliases = ("show output", "inspect", "debug", "print value", "show text")

    def input_types(self, folders):
        return {"required": {"source": ("*", {})}}

    def run(self, ctx, source=None):
        value = "None"
        if isinstance(source, str):
            value = source
        elif isinstance(source, (int, float, bool)):
            value = str(source)
        elif source is not None:
            try:
                value = json.dumps(source, indent=4)
            except Exception:
                value = str(source)
        return {"ui": {"text": (value,)}}


class CheckpointLoaderSimple(Node):
    display_name = "Load Checkpoint"
    category = "loaders"
    description = (
        "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    )
    return_types = ("MODEL", "CLIP", "VAE")
    output_tooltips = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )
    search_aliases = (
        "load model",
        "checkpoint",
        "model loader",
        "load checkpoint",
        "ckpt",
        "model",
    )

    def input_types(self, folders):
        return {
            "required": {
                "ckpt_name": (
                    folders.get_filename_list("checkpoints"),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                )
            }
        }

    def run(self, ctx, ckpt_name):
        path = ctx.runtime.folders.get_full_path("checkpoints", ckpt_name)
        if path is None:
            raise FileNotFoundError(
                f"Model in folder 'checkpoints' with filename '{ckpt_name}' not found."
            )
        model = LoadedModel("MODEL", ckpt_name, os.path.getsize(path))
        ctx.runtime.memory.load(ckpt_name, model.size)
        return {
            "result": (model, LoadedModel("CLIP", ckpt_name, 0), LoadedModel("VAE", ckpt_name, 0))
        }


# ---- test-only nodes ------------------------------------------------------------------------


class StandInTestNode(Node):
    """What every test-only node shares: its category, and an IMAGE passed through so it
    chains between EmptyImage and SaveImage; it always runs (never cached)."""

    category = "standin/testing"
    python_module = "standin"
    return_types = ("IMAGE",)
    always_run = True


class StandInSleep(StandInTestNode):
    """Sleeps ``seconds`` in ``steps`` steps, reporting progress; honours interrupt per step."""

    def input_types(self, folders):
        return {
            "required": {
                "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 86400.0}),
                "steps": ("INT", {"default": 10, "min": 1, "max": 100000}),
            },
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, ctx, seconds, steps, images=None):
        for step in range(steps):
            time.sleep(seconds / steps)
            ctx.progress(step + 1, steps)
        return {"result": (images or ImageBatch(8, 8, 1, 0),)}


class StandInSlowInterrupt(StandInTestNode):
    """Ignores interrupts for ``seconds`` (like a long CUDA kernel), then checks once."""

    def input_types(self, folders):
        return {
            "required": {"seconds": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 86400.0})},
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, ctx, seconds, images=None):
        time.sleep(seconds)
        ctx.progress(1, 1)
        return {"result": (images or ImageBatch(8, 8, 1, 0),)}


class StandInRaise(StandInTestNode):
    """Raises an exception (default RuntimeError) with ``message``."""

    exceptions: ClassVar[dict[str, type[Exception]]] = {
        "RuntimeError": RuntimeError,
        "ValueError": ValueError,
        "FileNotFoundError": FileNotFoundError,
        "Exception": Exception,
    }

    def input_types(self, folders):
        return {
            "required": {
                "message": ("STRING", {"default": "stand-in failure"}),
                "exception": (sorted(self.exceptions), {"default": "RuntimeError"}),
            },
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, ctx, message, exception="RuntimeError", images=None):
        raise self.exceptions[exception](message)


class StandInOutOfMemory(StandInTestNode):
    """Raises a CUDA out-of-memory error shaped like torch's (``torch.OutOfMemoryError``)."""

    def input_types(self, folders):
        return {
            "required": {"allocate_mib": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1e9})},
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, ctx, allocate_mib, images=None):
        total = ctx.runtime.memory.total / (1 << 30)
        raise OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {allocate_mib:.2f} MiB. GPU 0 has a total "
            f"capacity of {total:.2f} GiB of which 6.06 MiB is free. Including non-PyTorch "
            f"memory, this process has {total:.2f} GiB memory in use. Of the allocated memory "
            f"{max(total - 1, 0):.2f} GiB is allocated by PyTorch, and 589.36 MiB is reserved by "
            "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
            "documentation for Memory Management  "
            "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
        )


class StandInHang(StandInTestNode):
    """Never finishes and ignores interrupts: only killing the process ends it."""

    def input_types(self, folders):
        return {"required": {}, "optional": {"images": ("IMAGE",)}}

    def run(self, ctx, images=None):
        while True:
            time.sleep(3600)


class StandInDropWebSockets(StandInTestNode):
    """Closes every open websocket, refuses new ones for ``refuse_seconds``, then continues.

    Clients lose the events of this prompt that are sent meanwhile and must fall back on polling
    /history. ``seconds`` of work follow the drop, so the prompt finishes while they are away.
    """

    def input_types(self, folders):
        return {
            "required": {
                "refuse_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0}),
                "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 86400.0}),
            },
            "optional": {"images": ("IMAGE",)},
        }

    def run(self, ctx, refuse_seconds, seconds, images=None):
        ctx.runtime.drop_websockets(refuse_seconds)
        time.sleep(seconds)
        ctx.check_interrupt()
        return {"result": (images or ImageBatch(8, 8, 1, 0),)}


NODE_CLASS_MAPPINGS: dict[str, type[Node]] = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "SaveImage": SaveImage,
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "EmptyImage": EmptyImage,
    "PreviewAny": PreviewAny,
    "StandInSleep": StandInSleep,
    "StandInSlowInterrupt": StandInSlowInterrupt,
    "StandInRaise": StandInRaise,
    "StandInOutOfMemory": StandInOutOfMemory,
    "StandInHang": StandInHang,
    "StandInDropWebSockets": StandInDropWebSockets,
}


def node_info(name: str, folders: Folders) -> dict[str, Any]:
    """One entry of /object_info, as ComfyUI builds it for V1 nodes."""
    cls = NODE_CLASS_MAPPINGS[name]
    node = cls(folders)
    inputs = node.input_types(folders)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value.keys()) for key, value in inputs.items()},
        "output": list(cls.return_types),
        "output_is_list": [False] * len(cls.return_types),
        "output_name": list(cls.return_types),
        "name": name,
        "display_name": cls.display_name or name,
        "description": cls.description,
        "python_module": cls.python_module,
        "category": cls.category,
        "output_node": cls.output_node,
    }
    if cls.output_tooltips:
        info["output_tooltips"] = list(cls.output_tooltips)
    info["search_aliases"] = list(cls.search_aliases)
    return info


# --------------------------------------------------------------------------------------------
# Validation (execution.validate_prompt / validate_inputs)
# --------------------------------------------------------------------------------------------


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def types_match(received: Any, expected: Any) -> bool:
    if received == expected:
        return True
    if received == "*" or expected == "*":
        return True
    if isinstance(received, list) and expected == "COMBO":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool(set(received.split(",")) & set(expected.split(",")))


def input_info(
    inputs: dict[str, dict[str, Any]], name: str
) -> tuple[Any, str | None, dict[str, Any] | None]:
    for category in ("required", "optional", "hidden"):
        if name in inputs.get(category, {}):
            spec = inputs[category][name]
            if category == "hidden":
                return spec, category, {}
            input_type = spec[0]
            extra = spec[1] if len(spec) > 1 else {}
            return input_type, category, extra
    return None, None, None


def validate_inputs(
    prompt: dict[str, Any], unique_id: str, validated: dict[str, Any], folders: Folders
) -> tuple[bool, list[dict[str, Any]], str]:
    if unique_id in validated:
        return validated[unique_id]
    node_inputs = prompt[unique_id]["inputs"]
    class_type = prompt[unique_id]["class_type"]
    node = NODE_CLASS_MAPPINGS[class_type](folders)
    class_inputs = node.input_types(folders)
    errors: list[dict[str, Any]] = []
    valid = True
    # Inputs that VALIDATE_INPUTS takes skip the min, max and combo checks: it judges them.
    validate_function = getattr(node, "VALIDATE_INPUTS", None)
    validate_function_inputs: list[str] = []
    validate_has_kwargs = False
    if validate_function is not None:
        argspec = inspect.getfullargspec(validate_function)
        validate_function_inputs = argspec.args
        validate_has_kwargs = argspec.varkw is not None
    # ComfyUI walks a set here, so its error order varies; declaration order is stable.
    valid_inputs = [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]
    for x in valid_inputs:
        input_type, category, extra = input_info(class_inputs, x)
        assert extra is not None
        if x not in node_inputs:
            if category == "required":
                errors.append(
                    {
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": f"{x}",
                        "extra_info": {"input_name": x},
                    }
                )
            continue
        val = node_inputs[x]
        info = [input_type, extra]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(
                    {
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of "
                        "[node_id, slot_index]",
                        "details": f"{x}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                        },
                    }
                )
                continue
            o_id = val[0]
            received_type = NODE_CLASS_MAPPINGS[prompt[o_id]["class_type"]].return_types[val[1]]
            if not types_match(received_type, input_type):
                errors.append(
                    {
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{x}, received_type({received_type}) mismatch "
                        f"input_type({input_type})",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_type": received_type,
                            "linked_node": val,
                        },
                    }
                )
                continue
            try:
                r = validate_inputs(prompt, o_id, validated, folders)
                if r[0] is False:
                    valid = False
                    continue
            except Exception as ex:
                valid = False
                validated[o_id] = (
                    False,
                    [
                        {
                            "type": "exception_during_inner_validation",
                            "message": "Exception when validating inner node",
                            "details": str(ex),
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "exception_message": str(ex),
                                "exception_type": full_type_name(type(ex)),
                                "traceback": traceback.format_tb(ex.__traceback__),
                                "linked_node": val,
                            },
                        }
                    ],
                    o_id,
                )
                continue
        else:
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    node_inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                elif input_type == "FLOAT":
                    val = float(val)
                elif input_type == "STRING":
                    val = str(val)
                elif input_type == "BOOLEAN":
                    val = bool(val)
                node_inputs[x] = val
            except Exception as ex:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                            "exception_message": str(ex),
                        },
                    }
                )
                continue
            if x in validate_function_inputs or validate_has_kwargs:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append(
                    {
                        "type": "value_smaller_than_min",
                        "message": "Value {} smaller than min of {}".format(val, extra["min"]),
                        "details": f"{x}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                        },
                    }
                )
                continue
            if "max" in extra and val > extra["max"]:
                errors.append(
                    {
                        "type": "value_bigger_than_max",
                        "message": "Value {} bigger than max of {}".format(val, extra["max"]),
                        "details": f"{x}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                        },
                    }
                )
                continue
            if isinstance(input_type, list) or input_type == "COMBO":
                options = extra.get("options", []) if input_type == "COMBO" else input_type
                if val not in options:
                    input_config: Any = info
                    if len(options) > 20:
                        list_info = f"(list of length {len(options)})"
                        input_config = None
                    else:
                        list_info = str(options)
                    errors.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{x}: '{val}' not in {list_info}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": input_config,
                                "received_value": val,
                            },
                        }
                    )
                    continue
    if validate_function is not None and (validate_function_inputs or validate_has_kwargs):
        # Constants as they are now (converted); links give None, since nothing ran yet. An
        # exception here (e.g. a missing argument) fails the node's validation as in ComfyUI.
        input_filtered = {
            x: None if is_link(value) else value
            for x, value in node_inputs.items()
            if input_info(class_inputs, x)[1] is not None
            and (x in validate_function_inputs or validate_has_kwargs)
        }
        r = validate_function(**input_filtered)
        if r is not True:
            for x in input_filtered:
                errors.append(
                    {
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": f"{x}" if r is False else f"{x} - {r}",
                        "extra_info": {"input_name": x},
                    }
                )
    ret = (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
    validated[unique_id] = ret
    return ret


def _log_prompt(prompt_id: str, prompt: dict[str, Any]) -> None:
    """Test instrumentation, not in real ComfyUI: with COMFYUI_STANDIN_PROMPT_LOG set, one JSON
    line per accepted prompt, so tests can count how often a job reached ComfyUI."""
    path = os.environ.get("COMFYUI_STANDIN_PROMPT_LOG")
    if not path:
        return
    prefixes = [
        node["inputs"]["filename_prefix"]
        for node in prompt.values()
        if isinstance(node, dict)
        and isinstance(node.get("inputs"), dict)
        and isinstance(node["inputs"].get("filename_prefix"), str)
    ]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt_id": prompt_id, "filename_prefixes": prefixes}) + "\n")


def validate_prompt(
    prompt: dict[str, Any], partial_execution_targets: list[str] | None, folders: Folders
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    outputs = set()
    for x in prompt:
        if "class_type" not in prompt[x]:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        class_type = prompt[x]["class_type"]
        cls = NODE_CLASS_MAPPINGS.get(class_type) if isinstance(class_type, str) else None
        if cls is None:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {class_type} does not exist.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        if cls.output_node and (
            partial_execution_targets is None or x in partial_execution_targets
        ):
            outputs.add(x)
    if not outputs:
        return (
            False,
            {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            [],
            {},
        )
    good_outputs = set()
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, Any] = {}
    for o in sorted(outputs, key=_node_sort_key):
        try:
            valid, reasons, _ = validate_inputs(prompt, o, validated, folders)
        except Exception as ex:
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": full_type_name(type(ex)),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                }
            ]
            validated[o] = (False, reasons, o)
        if valid is True:
            good_outputs.add(o)
            continue
        log.error("Failed to validate prompt for output %s:", o)
        failed.append((o, reasons))
        for node_id, result in validated.items():
            if result[0] is not True and len(result[1]) > 0:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": result[1],
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)
        log.error("Output will be ignored")
    if not good_outputs:
        details = "\n".join(
            f"{error['message']}: {error['details']}" for _, errors in failed for error in errors
        )
        return (
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return True, None, sorted(good_outputs, key=_node_sort_key), node_errors


def _node_sort_key(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# --------------------------------------------------------------------------------------------
# Queue and history (execution.PromptQueue)
# --------------------------------------------------------------------------------------------


class PromptQueue:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[tuple] = []
        self.currently_running: dict[int, tuple] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}

    def put(self, item: tuple) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.on_change()
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[tuple, int] | None:
        with self.not_empty:
            while not self.queue:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and not self.queue:
                    return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.on_change()
            return item, i

    def task_done(self, item_id: int, history_result: dict[str, Any], status: dict) -> None:
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            prompt = prompt[:5] + prompt[6:]
            self.history[prompt[1]] = {
                "prompt": list(prompt),
                "outputs": {},
                "status": copy.deepcopy(status),
            }
            self.history[prompt[1]].update(history_result)
            self.on_change()

    def current_queue(self) -> tuple[list[tuple], list[tuple]]:
        with self.mutex:
            return list(self.currently_running.values()), sorted(self.queue, key=lambda q: q[:2])

    def tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []
            self.on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        with self.mutex:
            for x, item in enumerate(self.queue):
                if item[1] == prompt_id:
                    self.queue.pop(x)
                    heapq.heapify(self.queue)
                    self.on_change()
                    return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        with self.mutex:
            if prompt_id is None:
                out = {}
                if offset < 0 and max_items is not None:
                    offset = len(self.history) - max_items
                for i, key in enumerate(self.history):
                    if i >= offset:
                        out[key] = self.history[key]
                        if max_items is not None and len(out) >= max_items:
                            break
                return copy.deepcopy(out)
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}

    def wipe_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history_item(self, prompt_id: str) -> None:
        with self.mutex:
            self.history.pop(prompt_id, None)

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self) -> dict[str, Any]:
        with self.mutex:
            flags, self.flags = self.flags, {}
            return flags


# --------------------------------------------------------------------------------------------
# Simulated device memory (what /system_stats reports)
# --------------------------------------------------------------------------------------------


def _meminfo() -> tuple[int, int]:
    total = available = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    available = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if not total:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return total, available


class DeviceMemory:
    """A GPU's memory as ComfyUI reports it: loaded models are used, torch's cache counts as free.

    Sizes come from COMFYUI_STANDIN_VRAM_TOTAL_MB (default 143771, an H200) and
    COMFYUI_STANDIN_VRAM_USED_MB (memory used outside torch, default 0). With --cpu the "device"
    is system RAM, as in ComfyUI.
    """

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu
        self.lock = threading.Lock()
        self.total = int(float(os.environ.get("COMFYUI_STANDIN_VRAM_TOTAL_MB", "143771")) * MIB)
        self.other_used = int(float(os.environ.get("COMFYUI_STANDIN_VRAM_USED_MB", "0")) * MIB)
        self.loaded: dict[str, int] = {}
        self.torch_cache = 0

    def load(self, name: str, size: int) -> None:
        with self.lock:
            self.loaded[name] = size

    def after_prompt(self) -> None:
        with self.lock:
            self.torch_cache = max(self.torch_cache, 64 * MIB)

    def unload_all(self) -> None:
        with self.lock:
            self.loaded.clear()
            self.torch_cache = 0

    def device(self) -> dict[str, Any]:
        if self.cpu:
            total, available = _meminfo()
            return {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": total,
                "vram_free": available,
                "torch_vram_total": total,
                "torch_vram_free": available,
            }
        with self.lock:
            models = sum(self.loaded.values())
            torch_total = models + self.torch_cache
            return {
                "name": "cuda:0 NVIDIA H200 : cudaMallocAsync",
                "type": "cuda",
                "index": 0,
                "vram_total": self.total,
                "vram_free": max(self.total - self.other_used - models, 0),
                "torch_vram_total": torch_total,
                "torch_vram_free": self.torch_cache,
            }


# --------------------------------------------------------------------------------------------
# Execution (execution.PromptExecutor and main.prompt_worker)
# --------------------------------------------------------------------------------------------


class Runtime:
    """State shared by the server and the execution thread."""

    def __init__(self, args: argparse.Namespace, folders: Folders) -> None:
        self.args = args
        self.folders = folders
        self.memory = DeviceMemory(cpu=args.cpu)
        self.interrupt_lock = threading.Lock()
        self.interrupted = False
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.progress_nodes: dict[str, dict[str, Any]] = {}
        self.send_sync: Callable[[str, Any, str | None], None] = lambda *a: None
        self.drop_websockets: Callable[[float], None] = lambda seconds: None

    def interrupt(self, value: bool = True) -> None:
        with self.interrupt_lock:
            self.interrupted = value

    def throw_if_interrupted(self) -> None:
        with self.interrupt_lock:
            if self.interrupted:
                self.interrupted = False
                raise InterruptProcessingException()

    # comfy_execution.progress: the "progress_state" message lists every non-pending node.
    def _send_progress_state(self, prompt_id: str) -> None:
        nodes = {
            node_id: {
                "value": state["value"],
                "max": state["max"],
                "state": state["state"],
                "node_id": node_id,
                "prompt_id": prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, state in self.progress_nodes.items()
            if state["state"] != "pending"
        }
        self.send_sync("progress_state", {"prompt_id": prompt_id, "nodes": nodes}, self.client_id)

    def start_progress(self, prompt_id: str, node_id: str) -> None:
        self.progress_nodes[node_id] = {"state": "running", "value": 0.0, "max": 1.0}
        self._send_progress_state(prompt_id)

    def update_progress(self, prompt_id: str, node_id: str, value: float, total: float) -> None:
        self.progress_nodes[node_id] = {"state": "running", "value": value, "max": total}
        self._send_progress_state(prompt_id)

    def finish_progress(self, prompt_id: str, node_id: str) -> None:
        entry = self.progress_nodes.setdefault(node_id, {"value": 0, "max": 1})
        entry["state"] = "finished"
        entry["value"] = entry["max"]
        self._send_progress_state(prompt_id)

    def progress_hook(self, value: float, total: float, prompt_id: str, node_id: str) -> None:
        self.throw_if_interrupted()
        value = min(value, total)
        self.update_progress(prompt_id, node_id, value, total)
        self.send_sync(
            "progress",
            {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
            self.client_id,
        )


class ExecutionList:
    """The order ComfyUI runs nodes in (comfy_execution/graph.py's ExecutionList).

    Pending nodes are the outputs and their uncached ancestors; of the nodes whose inputs are all
    done, an output node goes first, then one that feeds an output directly, then one two links
    away, else the first pending. Iterating yields the next node once the previous one finished.
    """

    def __init__(self, prompt: dict[str, Any], outputs: list[str], cached: set[str]) -> None:
        self.prompt = prompt
        self.cached = cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, set[str]] = {}
        for node_id in outputs:
            self._add_node(node_id)

    def _is_output(self, node_id: str) -> bool:
        return NODE_CLASS_MAPPINGS[self.prompt[node_id]["class_type"]].output_node

    def _add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = True
            self.block_count[current] = 0
            self.blocking[current] = set()
            for value in self.prompt[current]["inputs"].values():
                if is_link(value):
                    if value[0] not in self.cached:
                        stack.append(value[0])
                    links.append((value[0], current))
        for from_id, to_id in links:
            if from_id not in self.cached:
                self._add_node(from_id)
                if to_id not in self.blocking[from_id]:
                    self.blocking[from_id].add(to_id)
                    self.block_count[to_id] += 1

    def _pick(self) -> str:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for blocked in self.blocking[node_id]:
                if any(self._is_output(b) for b in self.blocking[blocked]):
                    return node_id
        return ready[0]

    def __iter__(self) -> Iterator[str]:
        while self.pending:
            node_id = self._pick()
            yield node_id
            del self.pending[node_id]
            for blocked in self.blocking.pop(node_id):
                self.block_count[blocked] -= 1


class CacheEntry:
    def __init__(self, ui: dict[str, Any] | None, outputs: tuple) -> None:
        self.ui, self.outputs = ui, outputs


class PromptExecutor:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cache_enabled = not runtime.args.cache_none
        self.always_run_counter = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.cache: dict[str, CacheEntry] = {}
        self.status_messages: list[list[Any]] = []
        self.success = True
        self.history_result: dict[str, Any] = {}

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append([event, data])
        if self.runtime.client_id is not None or broadcast:
            self.runtime.send_sync(event, data, self.runtime.client_id)

    def _is_changed(self, node: dict[str, Any]) -> Any:
        """execution.IsChangedCache.get: False without IS_CHANGED, else what it returns for the
        node's constant inputs (links give None); a node that always runs, or whose IS_CHANGED
        raises (a NaN in ComfyUI), gets a value no other run has."""
        cls = NODE_CLASS_MAPPINGS[node["class_type"]]
        if cls.always_run:
            return ["NaN", next(self.always_run_counter)]
        instance = cls(self.runtime.folders)
        is_changed = getattr(instance, "IS_CHANGED", None)
        if is_changed is None:
            return False
        spec = instance.input_types(self.runtime.folders)
        inputs = {
            name: None if is_link(value) else value
            for name, value in node["inputs"].items()
            if input_info(spec, name)[1] is not None
        }
        try:
            return [is_changed(**inputs)]
        except Exception as ex:
            log.warning("WARNING: %s", ex)
            return ["NaN", next(self.always_run_counter)]

    # Output cache keyed by input signature: the node, its constant inputs and its ancestors.
    def _signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        is_changed = {node_id: self._is_changed(node) for node_id, node in prompt.items()}

        def immediate(node_id: str, order: dict[str, int]) -> list[Any]:
            node = prompt[node_id]
            sig: list[Any] = [node["class_type"], is_changed[node_id]]
            for key in sorted(node["inputs"]):
                value = node["inputs"][key]
                if is_link(value):
                    sig.append([key, ["ANCESTOR", order[value[0]], value[1]]])
                else:
                    sig.append([key, value])
            return sig

        def ancestry(node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
            inputs = prompt[node_id]["inputs"]
            for key in sorted(inputs):
                value = inputs[key]
                if is_link(value) and value[0] in prompt and value[0] not in order:
                    ancestors.append(value[0])
                    order[value[0]] = len(ancestors) - 1
                    ancestry(value[0], ancestors, order)

        keys = {}
        for node_id in prompt:
            ancestors: list[str] = []
            order: dict[str, int] = {}
            ancestry(node_id, ancestors, order)
            sig = [immediate(node_id, order)] + [immediate(a, order) for a in ancestors]
            keys[node_id] = json.dumps(sig, sort_keys=True, default=repr)
        return keys

    def execute(
        self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], outputs: list
    ) -> None:
        rt = self.runtime
        rt.interrupt(False)
        rt.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        keys = self._signatures(prompt)
        if self.cache_enabled:
            used = set(keys.values())
            self.cache = {k: v for k, v in self.cache.items() if k in used}
        else:
            self.cache = {}
        rt.progress_nodes = {}
        cached_nodes = [node_id for node_id in prompt if keys[node_id] in self.cache]
        self.add_message(
            "execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False
        )
        results: dict[str, tuple] = {
            node_id: self.cache[keys[node_id]].outputs for node_id in cached_nodes
        }
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: set[str] = set()
        current_outputs = list(prompt)
        self.success = True
        for node_id in ExecutionList(prompt, outputs, set(cached_nodes)):
            error = self._execute_node(
                prompt, prompt_id, node_id, extra_data, keys, results, ui_outputs, executed
            )
            if error is not None:
                self.success = False
                self._handle_error(prompt_id, prompt, current_outputs, executed, *error)
                break
        else:
            self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        self.history_result = {
            "outputs": {node_id: info["output"] for node_id, info in ui_outputs.items()},
            "meta": {node_id: info["meta"] for node_id, info in ui_outputs.items()},
        }
        rt.last_node_id = None
        rt.memory.after_prompt()

    def _execute_node(
        self, prompt, prompt_id, node_id, extra_data, keys, results, ui_outputs, executed
    ):
        rt = self.runtime
        node = prompt[node_id]
        cls = NODE_CLASS_MAPPINGS[node["class_type"]]
        cached = self.cache.get(keys[node_id])
        if cached is not None:
            if rt.client_id is not None:
                output = (cached.ui or {}).get("output")
                rt.send_sync(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": output,
                        "prompt_id": prompt_id,
                    },
                    rt.client_id,
                )
                if cached.ui is not None:
                    ui_outputs[node_id] = cached.ui
            rt.finish_progress(prompt_id, node_id)
            results[node_id] = cached.outputs
            return None

        input_data: dict[str, Any] | None = None
        try:
            rt.start_progress(prompt_id, node_id)
            instance = cls(rt.folders)
            input_data = self._input_data(instance, node_id, prompt, extra_data, results)
            if rt.client_id is not None:
                rt.last_node_id = node_id
                rt.send_sync(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                    rt.client_id,
                )
            rt.throw_if_interrupted()
            returned = instance.run(NodeContext(rt, prompt_id, node_id), **input_data)
            output_ui = returned.get("ui") or {}
            output_data = tuple(returned.get("result", ()))
            if output_ui:
                output_ui = json.loads(json.dumps(output_ui))
                ui_outputs[node_id] = {
                    "meta": {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    },
                    "output": output_ui,
                }
                if rt.client_id is not None:
                    rt.send_sync(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": output_ui,
                            "prompt_id": prompt_id,
                        },
                        rt.client_id,
                    )
            results[node_id] = output_data
            if self.cache_enabled:
                self.cache[keys[node_id]] = CacheEntry(ui_outputs.get(node_id), output_data)
        except InterruptProcessingException as iex:
            log.info("Processing interrupted")
            return {"node_id": node_id}, iex
        except Exception as ex:
            log.error("!!! Exception during processing !!! %s", ex)
            log.error("%s", traceback.format_exc())
            tips = OOM_TIPS if isinstance(ex, OutOfMemoryError) else ""
            if tips:
                log.error("Got an OOM, unloading all loaded models.")
                rt.memory.unload_all()
            formatted = {}
            if input_data is not None:
                formatted = {name: [_format_value(v)] for name, v in input_data.items()}
            return {
                "node_id": node_id,
                "exception_message": f"{ex}\n{tips}",
                "exception_type": full_type_name(type(ex)),
                "traceback": traceback.format_tb(ex.__traceback__),
                "current_inputs": formatted,
            }, ex
        rt.finish_progress(prompt_id, node_id)
        executed.add(node_id)
        return None

    def _input_data(self, instance, node_id, prompt, extra_data, results) -> dict[str, Any]:
        node = prompt[node_id]
        spec = instance.input_types(self.runtime.folders)
        data: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            _, category, _ = input_info(spec, name)
            if category is None:
                continue
            if is_link(value):
                data[name] = results[value[0]][value[1]]
            else:
                data[name] = value
        for name, kind in spec.get("hidden", {}).items():
            if kind == "PROMPT":
                data[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                data[name] = extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                data[name] = node_id
        return data

    def _handle_error(self, prompt_id, prompt, current_outputs, executed, error, ex) -> None:
        node_id = error["node_id"]
        mes = {
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": prompt[node_id]["class_type"],
            "executed": list(executed),
        }
        if isinstance(ex, InterruptProcessingException):
            self.add_message("execution_interrupted", mes, broadcast=True)
        else:
            mes.update(
                {
                    "exception_message": error["exception_message"],
                    "exception_type": error["exception_type"],
                    "traceback": error["traceback"],
                    "current_inputs": error["current_inputs"],
                    "current_outputs": list(current_outputs),
                }
            )
            self.add_message("execution_error", mes, broadcast=False)


def _format_value(x: Any) -> Any:
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


def prompt_worker(queue: PromptQueue, runtime: Runtime) -> None:
    executor = PromptExecutor(runtime)
    while True:
        got = queue.get(timeout=1000.0)
        if got is not None:
            item, item_id = got
            started = time.perf_counter()
            prompt_id = item[1]
            runtime.last_prompt_id = prompt_id
            extra_data = dict(item[3])
            extra_data.update(item[5])
            try:
                executor.execute(item[2], prompt_id, extra_data, item[4])
            except Exception:  # a bug here must not kill the queue
                log.exception("stand-in executor failed")
                executor.success = False
                executor.history_result = {"outputs": {}, "meta": {}}
            status = {
                "status_str": "success" if executor.success else "error",
                "completed": executor.success,
                "messages": executor.status_messages,
            }
            queue.task_done(item_id, executor.history_result, status)
            if runtime.client_id is not None:
                runtime.send_sync(
                    "executing", {"node": None, "prompt_id": prompt_id}, runtime.client_id
                )
            log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)
        flags = queue.get_flags()
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            runtime.memory.unload_all()
        if free_memory:
            executor.reset()


# --------------------------------------------------------------------------------------------
# HTTP and websocket server (server.PromptServer)
# --------------------------------------------------------------------------------------------


class PromptServer:
    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.loop = loop
        self.messages: asyncio.Queue = asyncio.Queue()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.refuse_ws_until = 0.0
        self.number = 0
        self.queue = PromptQueue(self.queue_updated)
        runtime.send_sync = self.send_sync
        runtime.drop_websockets = self.drop_websockets_sync
        self.app = web.Application(client_max_size=round(runtime.args.max_upload_size * MIB))
        routes = [
            ("GET", "/ws", self.websocket_handler),
            ("GET", "/", self.get_root),
            ("GET", "/embeddings", self.get_embeddings),
            ("GET", "/models", self.get_models),
            ("GET", "/models/{folder}", self.get_models_folder),
            ("GET", "/extensions", self.get_extensions),
            ("GET", "/view", self.view),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.get_features),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info_node),
            ("GET", "/api/jobs", self.get_jobs),
            ("GET", "/api/jobs/{job_id}", self.get_job),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/prompt", self.post_prompt),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("POST", "/history", self.post_history),
        ]
        # ComfyUI serves every route both bare and under /api.
        for method, path, handler in routes:
            self.app.router.add_route(method, "/api" + path, handler)
        for method, path, handler in routes:
            self.app.router.add_route(method, path, handler)

    # ---- messaging ----

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.queue_info()})

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        message = {"type": event, "data": data}
        targets = list(self.sockets.values()) if sid is None else [self.sockets.get(sid)]
        for ws in targets:
            if ws is None or ws.closed:
                continue
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError) as err:
                log.warning("send error: %s", err)

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self.messages.get()
            if event == "__drop_websockets__":
                await self._drop_websockets(data)
                continue
            await self.send_json(event, data, sid)

    def drop_websockets_sync(self, refuse_seconds: float) -> None:
        # Through the message queue, so events sent before the drop still go out first.
        self.send_sync("__drop_websockets__", refuse_seconds)

    async def _drop_websockets(self, refuse_seconds: float) -> None:
        self.refuse_ws_until = time.monotonic() + refuse_seconds
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close(code=1011, message=b"stand-in dropped the connection")
        log.info("dropped all websockets; refusing new ones for %.1f s", refuse_seconds)

    async def websocket_handler(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self.refuse_ws_until:
            return web.Response(status=503, text="websockets refused by the stand-in for now")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        try:
            await self.send_json("status", {"status": self.queue_info(), "sid": sid}, sid)
            rt = self.runtime
            if rt.client_id == sid and rt.last_node_id is not None:
                await self.send_json("executing", {"node": rt.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except json.JSONDecodeError:
                        log.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                        continue
                    if (
                        first_message
                        and isinstance(data, dict)
                        and data.get("type") == "feature_flags"
                    ):
                        await self.send_json("feature_flags", self.server_features(), sid)
                    first_message = False
        finally:
            if self.sockets.get(sid) is ws:
                self.sockets.pop(sid, None)
        return ws

    def server_features(self) -> dict[str, Any]:
        return {
            "supports_preview_metadata": True,
            "max_upload_size": self.runtime.args.max_upload_size * MIB,
            "extension": {"manager": {"supports_v4": True}},
        }

    # ---- routes ----

    async def get_root(self, request: web.Request) -> web.Response:
        return web.Response(text="ComfyUI v0.11.0 stand-in (no frontend)\n")

    async def get_embeddings(self, request: web.Request) -> web.Response:
        names = self.runtime.folders.get_filename_list("embeddings")
        return web.json_response([os.path.splitext(n)[0] for n in names])

    async def get_models(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.runtime.folders.model_paths))

    async def get_models_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if LEGACY_FOLDER_NAMES.get(folder, folder) not in self.runtime.folders.model_paths:
            return web.Response(status=404)
        return web.json_response(self.runtime.folders.get_filename_list(folder))

    async def get_extensions(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        folders = self.runtime.folders
        if "filename" in query:
            filename = query["filename"]
            output_dir = None
            for suffix, type_name in (
                ("[output]", "output"),
                ("[input]", "input"),
                ("[temp]", "temp"),
            ):
                if filename.endswith(suffix):
                    filename = filename[: -len(suffix) - 1]
                    output_dir = folders.directory_by_type(type_name)
                    break
            if not filename:
                return web.Response(status=400)
            if filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            if output_dir is None:
                output_dir = folders.directory_by_type(query.get("type", "output"))
            if output_dir is None:
                return web.Response(status=400)
            if "subfolder" in query:
                full_output_dir = os.path.join(output_dir, query["subfolder"])
                if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
                    return web.Response(status=403)
                output_dir = full_output_dir
            filename = os.path.basename(filename)
            file = os.path.join(output_dir, filename)
            if os.path.isfile(file):
                content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                if content_type in {
                    "text/html",
                    "application/xhtml+xml",
                    "text/javascript",
                    "text/css",
                }:
                    content_type = "application/octet-stream"
                return web.FileResponse(
                    file,
                    headers={
                        "Content-Disposition": f'filename="{filename}"',
                        "Content-Type": content_type,
                    },
                )
        return web.Response(status=404)

    async def system_stats(self, request: web.Request) -> web.Response:
        ram_total, ram_free = _meminfo()
        return web.json_response(
            {
                "system": {
                    "os": sys.platform,
                    "ram_total": ram_total,
                    "ram_free": ram_free,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": "1.37.11",
                    "installed_templates_version": "0.8.24",
                    "required_templates_version": "0.8.24",
                    "python_version": sys.version,
                    "pytorch_version": "2.14.1+standin",
                    "embedded_python": False,
                    "argv": sys.argv,
                },
                "devices": [self.runtime.memory.device()],
            }
        )

    async def get_features(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_features())

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue_info())

    async def get_object_info(self, request: web.Request) -> web.Response:
        folders = self.runtime.folders
        return web.json_response({name: node_info(name, folders) for name in NODE_CLASS_MAPPINGS})

    async def get_object_info_node(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        out = {}
        if name in NODE_CLASS_MAPPINGS:
            out[name] = node_info(name, self.runtime.folders)
        return web.json_response(out)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.rel_url.query.get("max_items")
        offset = request.rel_url.query.get("offset")
        return web.json_response(
            self.queue.get_history(
                max_items=int(max_items) if max_items is not None else None,
                offset=int(offset) if offset is not None else -1,
            )
        )

    async def get_history_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue.current_queue()
        return web.json_response(
            {
                "queue_running": [list(item[:5]) for item in running],
                "queue_pending": [list(item[:5]) for item in pending],
            }
        )

    async def get_jobs(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        statuses = ["pending", "in_progress", "completed", "failed", "cancelled"]
        status_filter = statuses
        if query.get("status"):
            status_filter = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            invalid = [s for s in status_filter if s not in statuses]
            if invalid:
                return web.json_response(
                    {
                        "error": f"Invalid status value(s): {', '.join(invalid)}. "
                        f"Valid values: {', '.join(statuses)}"
                    },
                    status=400,
                )
        sort_by = query.get("sort_by", "created_at").lower()
        sort_order = query.get("sort_order", "desc").lower()
        if sort_by not in {"created_at", "execution_duration"}:
            return web.json_response(
                {"error": "sort_by must be 'created_at' or 'execution_duration'"}, status=400
            )
        if sort_order not in {"asc", "desc"}:
            return web.json_response({"error": "sort_order must be 'asc' or 'desc'"}, status=400)
        limit = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return web.json_response({"error": "limit must be an integer"}, status=400)
            if limit <= 0:
                return web.json_response({"error": "limit must be a positive integer"}, status=400)
        try:
            offset = max(int(query.get("offset", "0")), 0)
        except ValueError:
            return web.json_response({"error": "offset must be an integer"}, status=400)
        running, pending = self.queue.current_queue()
        jobs = []
        if "in_progress" in status_filter:
            jobs += [_queue_job(item, "in_progress") for item in running]
        if "pending" in status_filter:
            jobs += [_queue_job(item, "pending") for item in pending]
        for prompt_id, entry in self.queue.get_history().items():
            job = _history_job(prompt_id, entry, include_outputs=False)
            if job["status"] in status_filter:
                jobs.append(job)
        workflow_id = query.get("workflow_id")
        if workflow_id:
            jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]

        def sort_key(job: dict[str, Any]) -> float:
            if sort_by == "execution_duration":
                start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
                return end - start if end and start else 0
            return job.get("create_time", 0)

        jobs.sort(key=sort_key, reverse=sort_order == "desc")
        total = len(jobs)
        jobs = jobs[offset:]
        if limit is not None:
            jobs = jobs[:limit]
        return web.json_response(
            {
                "jobs": jobs,
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": total,
                    "has_more": offset + len(jobs) < total,
                },
            }
        )

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        history = self.queue.get_history(prompt_id=job_id)
        if job_id in history:
            return web.json_response(_history_job(job_id, history[job_id], include_outputs=True))
        running, pending = self.queue.current_queue()
        for items, status in ((running, "in_progress"), (pending, "pending")):
            for item in items:
                if item[1] == job_id:
                    return web.json_response(_queue_job(item, status))
        return web.json_response({"error": "Job not found"}, status=404)

    async def post_prompt(self, request: web.Request) -> web.Response:
        log.info("got prompt")
        json_data = await request.json()
        if "number" in json_data:
            number: float = float(json_data["number"])
        else:
            number = self.number
            if json_data.get("front"):
                number = -number
            self.number += 1
        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        valid, error, outputs, node_errors = validate_prompt(
            prompt, json_data.get("partial_execution_targets"), self.runtime.folders
        )
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid:
            log.warning("invalid prompt: %s", error)
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        _log_prompt(prompt_id, prompt)
        sensitive = {k: extra_data.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        self.queue.put((number, prompt_id, prompt, extra_data, outputs, sensitive))
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            self.queue.wipe_queue()
        for prompt_id in json_data.get("delete", []):
            self.queue.delete_queue_item(prompt_id)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            json_data = await request.json()
        except (json.JSONDecodeError, ValueError):
            json_data = {}
        prompt_id = json_data.get("prompt_id") if isinstance(json_data, dict) else None
        if prompt_id:
            running, _ = self.queue.current_queue()
            if any(item[1] == prompt_id for item in running):
                log.info("Interrupting prompt %s", prompt_id)
                self.runtime.interrupt()
            else:
                log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            log.info("Global interrupt (no prompt_id specified)")
            self.runtime.interrupt()
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("unload_models", False):
            self.queue.set_flag("unload_models", json_data["unload_models"])
        if json_data.get("free_memory", False):
            self.queue.set_flag("free_memory", json_data["free_memory"])
        return web.Response(status=200)

    async def post_history(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            self.queue.wipe_history()
        for prompt_id in json_data.get("delete", []):
            self.queue.delete_history_item(prompt_id)
        return web.Response(status=200)


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _job_metadata(extra_data: dict[str, Any]) -> tuple[Any, Any]:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    return extra_data.get("create_time"), workflow.get("id")


def _queue_job(item: tuple, status: str) -> dict[str, Any]:
    create_time, workflow_id = _job_metadata(item[3])
    return _prune(
        {
            "id": item[1],
            "status": status,
            "priority": item[0],
            "create_time": create_time,
            "outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )


def _history_job(prompt_id: str, entry: dict[str, Any], include_outputs: bool) -> dict[str, Any]:
    priority, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _job_metadata(extra_data)
    status_info = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
            elif event == "execution_interrupted":
                interrupted = True
    if status_info.get("status_str") == "error":
        status = "cancelled" if interrupted else "failed"
    else:
        status = "completed"
    count, preview = 0, None
    fallback = None
    outputs = entry.get("outputs", {})
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if preview is None and media_type in ("images", "video", "audio"):
                    enriched = {**item, "nodeId": node_id, "mediaType": media_type}
                    if item.get("type") == "output":
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    job = _prune(
        {
            "id": prompt_id,
            "status": status,
            "priority": priority,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "preview_output": preview or fallback,
            "workflow_id": workflow_id,
        }
    )
    if include_outputs:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def build_folders(args: argparse.Namespace) -> Folders:
    base = args.base_directory or os.path.dirname(os.path.realpath(__file__))
    folders = Folders(base)
    default_yaml = os.path.join(
        os.path.dirname(os.path.realpath(__file__)), "extra_model_paths.yaml"
    )
    if os.path.isfile(default_yaml):
        folders.load_extra_model_paths(default_yaml)
    for path in itertools.chain(*(args.extra_model_paths_config or [])):
        folders.load_extra_model_paths(path)
    if args.output_directory:
        folders.output_dir = os.path.abspath(args.output_directory)
        log.info("Setting output directory to: %s", folders.output_dir)
    for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folders.add_model_folder_path(name, os.path.join(folders.output_dir, name))
    if args.input_directory:
        folders.input_dir = os.path.abspath(args.input_directory)
        log.info("Setting input directory to: %s", folders.input_dir)
    if args.temp_directory:
        folders.temp_dir = os.path.join(os.path.abspath(args.temp_directory), "temp")
    for path in (folders.output_dir, folders.input_dir, folders.temp_dir):
        os.makedirs(path, exist_ok=True)
    return folders


async def serve(args: argparse.Namespace, runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()
    server = PromptServer(runtime, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=prompt_worker, args=(server.queue, runtime), daemon=True).start()
    publisher = asyncio.ensure_future(server.publish_loop())
    if args.standin_startup_delay > 0:
        log.info("simulating a slow start: %.1f s before listening", args.standin_startup_delay)
        await asyncio.sleep(args.standin_startup_delay)
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    log.info("Starting server\n")
    for address in args.listen.split(","):
        await web.TCPSite(runner, address, args.port).start()
        shown = f"[{address}]" if ":" in address else address
        log.info("To see the GUI go to: http://%s:%d", shown, args.port)
    try:
        await stop.wait()
    finally:
        log.info("Stopped server")
        for ws in list(server.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        publisher.cancel()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.verbose).upper(), logging.INFO),
        format="%(message)s",
        stream=sys.stdout if args.log_stdout else sys.stderr,
    )
    log.info("ComfyUI version: %s (stand-in)", COMFYUI_VERSION)
    if args.ignored_flags:
        log.info("stand-in ignores these flags: %s", " ".join(args.ignored_flags))
    if args.base_directory and not os.path.isdir(os.path.join(args.base_directory, "custom_nodes")):
        # ComfyUI lists this folder before anything else and dies when it is missing.
        log.error(
            "FileNotFoundError: [Errno 2] No such file or directory: %r",
            os.path.join(os.path.abspath(args.base_directory), "custom_nodes"),
        )
        sys.exit(1)
    folders = build_folders(args)
    runtime = Runtime(args, folders)
    asyncio.run(serve(args, runtime))


if __name__ == "__main__":
    main()
