"""A job's input files: found in the workflow, checked, fetched into a folder of this job only.

Participants upload into the app server's inputs folder; a workflow's file input `name` means
`<inputs>/<user_id>/<name>` and `shared/<name>` means `<inputs>/shared/<name>` (CONTRACTS §5).
Before the prompt is submitted every such value is checked, the file is fetched into
`<ComfyUI input folder>/<job_id>/<name>`, and the value rewritten to `<job_id>/<name>`. ComfyUI's
own loaders resolve names without a containment check (an absolute path or a ` [output]`
annotation reads any file), so anything that could leave the participant's own files fails the
job here, before ComfyUI sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from exchange import (
    ExchangeClient,
    ExchangeRefused,
    ExchangeUnavailable,
    InputTooLarge,
    with_retries,
)
from jobs import JobFailure

# The inputs of ComfyUI v0.11.0's core nodes whose value is a file of the input folder: the one
# list of them. Nodes of other packs are found at run time from the upload flags that
# /object_info reports on their combo inputs (UPLOAD_FLAGS).
FILE_INPUTS: Mapping[str, tuple[str, ...]] = {
    "LoadImage": ("image",),
    "LoadImageMask": ("image",),
    "LoadImageOutput": ("image",),
    "WebcamCapture": ("image",),
    "LoadLatent": ("latent",),
    "LoadAudio": ("audio",),
    "LoadVideo": ("file",),
    # Its `image` is a dict of file names in ComfyUI's temp folder: refused as not a file name.
    "Load3D": ("model_file", "image"),
    # A plain string input (no list that ComfyUI checks) read through get_annotated_filepath.
    "RecordAudio": ("audio",),
    "GeminiInputFiles": ("file",),
    "OpenAIInputFiles": ("file",),
}
# Node types that read or write a whole folder named by the workflow, joined to ComfyUI's input
# or output folder without a containment check: no job may use them.
REFUSED_NODES: Mapping[str, str] = {
    "LoadImageDataSetFromFolder": "reads a folder named in the workflow",
    "LoadImageTextDataSetFromFolder": "reads a folder named in the workflow",
    "LoadTrainingDataset": "reads a folder named in the workflow",
    "SaveImageDataSetToFolder": "writes a folder named in the workflow",
    "SaveImageTextDataSetToFolder": "writes a folder named in the workflow",
    "SaveTrainingDataset": "writes a folder named in the workflow",
}
# Flags on a combo input's options in /object_info that mark a file of the input folder.
UPLOAD_FLAGS = ("image_upload", "audio_upload", "video_upload", "file_upload")
SHARED = "shared"


def file_inputs_from_object_info(object_info: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Class type -> file inputs, for every node whose combo input carries an upload flag."""
    found: dict[str, tuple[str, ...]] = {}
    for class_type, info in object_info.items():
        names = []
        spec_groups = (info.get("input") or {}) if isinstance(info, dict) else {}
        for group in ("required", "optional"):
            specs = spec_groups.get(group) or {}
            for name, spec in specs.items() if isinstance(specs, dict) else ():
                options = spec[1] if isinstance(spec, list) and len(spec) > 1 else None
                if isinstance(options, dict) and any(options.get(f) for f in UPLOAD_FLAGS):
                    names.append(name)
        if names:
            found[class_type] = tuple(names)
    return found


@dataclass(frozen=True)
class InputRef:
    """One file input of the workflow, checked: `area` is the user's uploads or `shared`."""

    node_id: str
    class_type: str
    input: str
    value: str
    area: str
    name: str

    def remote(self, user_id: str) -> str:
        """Its path under the exchange's inputs/ (and the app server's inputs folder)."""
        return f"{SHARED}/{self.name}" if self.area == SHARED else f"{user_id}/{self.name}"

    @property
    def local(self) -> str:
        """Its path under the job's own input folder (the workflow value after `<job_id>/`)."""
        return f"{SHARED}/{self.name}" if self.area == SHARED else self.name

    def where(self) -> str:
        return f"node {self.node_id} ({self.class_type}) input {self.input!r}"

    def failure(self, kind: str, why: str) -> JobFailure:
        """The job's failure, naming this node and input."""
        return JobFailure(
            kind, f"{self.where()}: {why}", {"node_id": self.node_id, "input": self.input}
        )


def parse_name(value: Any) -> tuple[str, str]:
    """(area, name) of a file input's value; ValueError saying why it is refused."""
    if not isinstance(value, str):
        raise ValueError(
            f"must be a file name, got {type(value).__name__} (a link to another node's output "
            "cannot be checked before the run)"
        )
    if not value.strip():
        raise ValueError("is empty")
    if "\0" in value:
        raise ValueError("contains a NUL character")
    if "\\" in value:
        raise ValueError(f"{value!r} contains a backslash")
    name = value
    if name.endswith(" [input]"):
        name = name[: -len(" [input]")]
    for annotation in ("[output]", "[temp]", "[input]"):
        if name.rstrip().endswith(annotation):
            raise ValueError(
                f"{value!r} points into ComfyUI's {annotation[1:-1]} folder; "
                "only the participant's uploads and shared/ can be read"
                if annotation != "[input]"
                else f"{value!r} has more than one annotation"
            )
    if name.startswith("/"):
        raise ValueError(f"{value!r} is an absolute path; use a name relative to your uploads")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{value!r} has an empty, '.' or '..' path segment")
    if parts[0] == SHARED:
        if len(parts) == 1:
            raise ValueError(f"{value!r} names the shared folder, not a file in it")
        return SHARED, "/".join(parts[1:])
    return "user", name


def find_inputs(
    workflow: Mapping[str, Any], extra: Mapping[str, tuple[str, ...]] | None = None
) -> list[InputRef]:
    """Every file input of the workflow, checked; JobFailure(invalid_input) for a bad one."""
    refs = []
    for node_id, node in workflow.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type in REFUSED_NODES:
            raise JobFailure(
                "invalid_input",
                f"node {node_id} ({class_type}) {REFUSED_NODES[class_type]}, which could reach "
                "other participants' files; it is not available on the workshop's workers",
                {"node_id": str(node_id)},
            )
        names = FILE_INPUTS.get(class_type, ()) + ((extra or {}).get(class_type, ()))
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not names or not isinstance(inputs, dict):
            continue
        for input_name in dict.fromkeys(names):
            if input_name not in inputs:
                continue
            value = inputs[input_name]
            try:
                area, name = parse_name(value)
            except ValueError as exc:
                raise JobFailure(
                    "invalid_input",
                    f"node {node_id} ({class_type}) input {input_name!r}: {exc}",
                    {"node_id": str(node_id), "input": input_name},
                ) from None
            refs.append(InputRef(str(node_id), class_type, input_name, value, area, name))
    return refs


def rewrite(workflow: Mapping[str, Any], refs: Iterable[InputRef], job_id: str) -> dict[str, Any]:
    """A copy of the workflow whose file inputs name the job's own copies."""
    rewritten = dict(workflow)
    for ref in refs:
        node = dict(rewritten[ref.node_id])
        node["inputs"] = {**node["inputs"], ref.input: f"{job_id}/{ref.local}"}
        rewritten[ref.node_id] = node
    return rewritten


class InputSource(Protocol):
    """Where participants' files are read from."""

    async def fetch(self, remote: str, dest: str, max_bytes: int) -> int:
        """Copy the file at `remote` (under the inputs root) to dest; returns its size.

        Raises FileNotFoundError, InputTooLarge, or ExchangeUnavailable (worth retrying).
        """


class ExchangeInputs:
    """Inputs from the app server's exchange (OUTPUT_DELIVERY=exchange)."""

    def __init__(self, client: ExchangeClient, retry_for: float, backoff_max: float) -> None:
        self.client = client
        self.retry_for = retry_for
        self.backoff_max = backoff_max
        self.give_up: Callable[[], bool] = lambda: False

    async def fetch(self, remote: str, dest: str, max_bytes: int) -> int:
        try:
            return await with_retries(
                lambda: self.client.fetch(remote, dest, max_bytes),
                self.retry_for,
                self.backoff_max,
                self.give_up,
            )
        except ExchangeRefused as exc:
            if exc.status in (403, 404):
                raise FileNotFoundError(remote) from None
            raise


class LocalInputs:
    """Inputs from a folder of this host that the app server shares (OUTPUT_DELIVERY=local)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    async def fetch(self, remote: str, dest: str, max_bytes: int) -> int:
        area = os.path.join(self.root, remote.split("/", 1)[0])
        source = os.path.realpath(os.path.join(self.root, remote))
        # A link inside the inputs tree must not lead out of the owner's (or shared) folder.
        if os.path.commonpath([area, source]) != area or not os.path.isfile(source):
            raise FileNotFoundError(remote)
        if os.path.getsize(source) > max_bytes:
            raise InputTooLarge(str(os.path.getsize(source)))
        await asyncio.to_thread(shutil.copyfile, source, dest)
        return os.path.getsize(dest)


class InputStager:
    """Fetches a job's inputs into `<input_root>/<job_id>/` and removes them afterwards."""

    def __init__(self, source: InputSource, input_root: str, max_job_bytes: int) -> None:
        self.source = source
        self.input_root = input_root
        self.max_job_bytes = max_job_bytes

    def job_folder(self, job_id: str) -> str:
        return os.path.join(self.input_root, job_id)

    async def stage(self, job_id: str, user_id: str, refs: list[InputRef]) -> int:
        """Fetch every referenced file once; returns the bytes fetched."""
        folder = self.job_folder(job_id)
        fetched: dict[str, int] = {}
        for ref in refs:
            if ref.local in fetched:
                continue
            dest = os.path.join(folder, ref.local)
            budget = self.max_job_bytes - sum(fetched.values())
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fetched[ref.local] = await self.source.fetch(ref.remote(user_id), dest, budget)
            except FileNotFoundError:
                where = "the workshop's shared inputs" if ref.area == SHARED else "your uploads"
                raise ref.failure(
                    "input_missing",
                    f"{ref.value!r} is not among {where} on the app server "
                    f"(inputs/{ref.remote(user_id)})",
                ) from None
            except InputTooLarge:
                raise ref.failure(
                    "input_too_large",
                    f"the job's inputs exceed INPUT_MAX_JOB_BYTES ({self.max_job_bytes} bytes) "
                    f"with {ref.value!r}",
                ) from None
            except ExchangeUnavailable as exc:
                raise ref.failure(
                    "inputs",
                    f"could not fetch {ref.value!r} from the app server's file exchange: {exc}",
                ) from exc
            except ExchangeRefused as exc:
                raise ref.failure("inputs", str(exc)) from exc
            except OSError as exc:  # e.g. `a` and `a/b` in one job, or a name too long
                raise ref.failure(
                    "invalid_input",
                    f"{ref.value!r} cannot be staged beside the job's other inputs "
                    f"({exc.strerror})",
                ) from None
        return sum(fetched.values())

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_folder(job_id), ignore_errors=True)

    def remove_all(self) -> list[str]:
        """At start: folders of jobs a previous run of this worker left behind."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in _entries(self.input_root):
                shutil.rmtree(os.path.join(self.input_root, entry), ignore_errors=True)
                removed.append(entry)
        return removed


def _entries(path: str) -> Iterator[str]:
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                yield entry.name
