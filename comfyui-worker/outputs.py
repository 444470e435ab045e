"""Moving a job's outputs out of ComfyUI into `/outputs/<user_id>/<job_id>/`.

Each job's save nodes get a `<job_id>/` subfolder in their filename_prefix. ComfyUI caches node
results, so an identical workflow would otherwise be answered from cache with the file names of
an earlier job, whose files were already moved away, and ComfyUI's file counter restarts once its
folder is emptied, so names would repeat across jobs. With the job id in the prefix every job
re-runs its save nodes into a folder of its own, while expensive upstream nodes stay cached.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import posixpath
import shutil
from typing import Any

from comfy_client import ComfyClient
from jobs import JobFailure, is_safe_segment

log = logging.getLogger("comfyui_worker.outputs")
TEXT_KINDS = ("text", "string", "strings")


def _check_prefix(node_id: str, node: dict[str, Any], prefix: str) -> None:
    """ComfyUI confines writes to its output folder, not to the job's folder inside it."""
    why = None
    if "\0" in prefix or "\\" in prefix:
        why = "contains a NUL or a backslash"
    elif prefix.startswith("/"):
        why = "is an absolute path"
    elif ".." in prefix.split("/"):
        why = "has a '..' path segment"
    if why:
        raise JobFailure(
            "invalid_job",
            f"node {node_id} ({node.get('class_type')}) input 'filename_prefix': "
            f"{prefix!r} {why}; a prefix may only name subfolders of the job's outputs",
            {"node_id": str(node_id), "input": "filename_prefix"},
        )


def tag_workflow(workflow: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A copy of the workflow whose string filename_prefix inputs start with `<job_id>/`."""
    tagged = dict(workflow)
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and "filename_prefix" in inputs:
            if not isinstance(inputs["filename_prefix"], str):
                raise JobFailure(
                    "invalid_job",
                    f"node {node_id} ({node.get('class_type')}) input 'filename_prefix' must be "
                    "a literal string, not a link to another node's output",
                    {"node_id": str(node_id), "input": "filename_prefix"},
                )
            _check_prefix(node_id, node, inputs["filename_prefix"])
            node = copy.copy(node)
            node["inputs"] = {**inputs, "filename_prefix": f"{job_id}/{inputs['filename_prefix']}"}
            tagged[node_id] = node
    return tagged


def job_dir(outputs_dir: str, user_id: str, job_id: str) -> str:
    """`<outputs_dir>/<user_id>/<job_id>`, refusing anything that could leave outputs_dir."""
    if not is_safe_segment(user_id) or not is_safe_segment(job_id):
        raise JobFailure("invalid_job", f"unsafe output path segment: {user_id!r}/{job_id!r}")
    root = os.path.realpath(outputs_dir)
    path = os.path.join(root, user_id, job_id)
    os.makedirs(path, exist_ok=True)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise JobFailure("invalid_job", f"output folder for {user_id!r} resolves outside {root}")
    return path


def _relative_subfolder(subfolder: str, job_id: str) -> str:
    """ComfyUI's subfolder without our `<job_id>/` tag, checked to stay inside the job folder."""
    sub = posixpath.normpath(subfolder.replace("\\", "/")) if subfolder else ""
    if sub in (".", ""):
        return ""
    parts = sub.split("/")
    if parts[0] == job_id:
        parts = parts[1:]
    if any(p in ("", ".", "..") or "\0" in p for p in parts) or sub.startswith("/"):
        raise JobFailure("outputs", f"ComfyUI reported an unsafe subfolder {subfolder!r}")
    return "/".join(parts)


def _unique(path: str) -> str:
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}_{n}{ext}"):
        n += 1
    return f"{stem}_{n}{ext}"


async def collect(
    outputs: dict[str, Any],
    dest_dir: str,
    job_id: str,
    comfy: ComfyClient,
    comfy_output_dir: str,
) -> list[dict[str, Any]]:
    """Move or download every file and write every text output; returns the result list."""
    listed: list[dict[str, Any]] = []
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for kind, items in ui.items():
            if not isinstance(items, list):
                continue
            for index, item in enumerate(items):
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    listed.append(
                        await _collect_file(
                            str(node_id), kind, item, dest_dir, job_id, comfy, comfy_output_dir
                        )
                    )
                elif kind in TEXT_KINDS and isinstance(item, str):
                    listed.append(_write_text(str(node_id), kind, index, item, dest_dir))
    if comfy_output_dir:
        listed += _collect_unlisted(os.path.join(comfy_output_dir, job_id), dest_dir)
        _remove_empty_tree(os.path.join(comfy_output_dir, job_id))
    return listed


def _collect_unlisted(job_output: str, dest_dir: str) -> list[dict[str, Any]]:
    """Files the job wrote that ComfyUI did not report (model and LoRA savers report none)."""
    listed = []
    for current, _dirs, files in os.walk(job_output):
        for name in sorted(files):
            source = os.path.join(current, name)
            if os.path.islink(source) or not os.path.isfile(source):
                continue
            rel_sub = os.path.relpath(current, job_output)
            rel_sub = "" if rel_sub == "." else rel_sub.replace(os.sep, "/")
            target_dir = os.path.join(dest_dir, rel_sub) if rel_sub else dest_dir
            os.makedirs(target_dir, exist_ok=True)
            target = _unique(os.path.join(target_dir, name))
            shutil.move(source, target)
            listed.append(
                {
                    "node_id": "",
                    "kind": "files",
                    "filename": os.path.basename(target),
                    "subfolder": rel_sub,
                    "type": "output",
                    "path": target,
                    "size": os.path.getsize(target),
                }
            )
    return listed


async def _collect_file(
    node_id: str,
    kind: str,
    item: dict[str, Any],
    dest_dir: str,
    job_id: str,
    comfy: ComfyClient,
    comfy_output_dir: str,
) -> dict[str, Any]:
    filename = item["filename"]
    name = posixpath.basename(filename.replace("\\", "/"))
    if name in ("", ".", "..") or "\0" in name or name != filename:
        raise JobFailure("outputs", f"ComfyUI reported an unsafe file name {filename!r}")
    subfolder = str(item.get("subfolder") or "")
    file_type = str(item.get("type") or "output")
    rel_sub = _relative_subfolder(subfolder, job_id)
    target_dir = os.path.join(dest_dir, rel_sub) if rel_sub else dest_dir
    os.makedirs(target_dir, exist_ok=True)
    target = _unique(os.path.join(target_dir, name))
    moved = False
    if file_type == "output" and comfy_output_dir:
        root = os.path.realpath(comfy_output_dir)
        source = os.path.realpath(os.path.join(root, subfolder, name))
        if os.path.commonpath([root, source]) == root and os.path.isfile(source):
            shutil.move(source, target)
            moved = True
    if not moved:
        await comfy.download(filename, subfolder, file_type, target)
    return {
        "node_id": node_id,
        "kind": kind,
        "filename": os.path.basename(target),
        "subfolder": rel_sub,
        "type": file_type,
        "path": target,
        "size": os.path.getsize(target),
    }


def _write_text(node_id: str, kind: str, index: int, text: str, dest_dir: str) -> dict[str, Any]:
    safe_node = "".join(c if c.isalnum() or c in "_-" else "_" for c in node_id) or "node"
    target = _unique(os.path.join(dest_dir, f"{kind}_{safe_node}_{index}.txt"))
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(text)
    return {
        "node_id": node_id,
        "kind": kind,
        "filename": os.path.basename(target),
        "subfolder": "",
        "type": "text",
        "path": target,
        "size": os.path.getsize(target),
        "text": text[:2000],
    }


def _remove_empty_tree(path: str) -> None:
    """Delete the job's now-empty folders in ComfyUI's output directory."""
    for current, _dirs, _files in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(current)


def enforce_caps(files: list[dict[str, Any]], max_file: int, max_job: int) -> None:
    """JobFailure naming the cap when one output, or all of them together, are too large."""
    total = 0
    for item in files:
        total += item["size"]
        if item["size"] > max_file:
            raise JobFailure(
                "output_too_large",
                f"output {item['filename']!r} of node {item['node_id']} is {item['size']} bytes, "
                f"over OUTPUT_MAX_FILE_BYTES ({max_file})",
            )
    if total > max_job:
        raise JobFailure(
            "output_too_large",
            f"the job's {len(files)} outputs are {total} bytes in all, "
            f"over OUTPUT_MAX_JOB_BYTES ({max_job})",
        )


def published(files: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
    """The result's list of outputs: each path relative to the outputs root, no host paths."""
    listed = []
    for item in files:
        entry = dict(item)
        entry["path"] = os.path.relpath(item["path"], root).replace(os.sep, "/")
        listed.append(entry)
    return listed


def remove_tree(path: str, stop_at: str) -> None:
    """Delete a job's folder, then its user folder when that is left empty."""
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    if parent != stop_at:
        with contextlib.suppress(OSError):
            os.rmdir(parent)
