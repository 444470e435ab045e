"""Fast tests of the pure parts: job validation, ComfyUI history parsing, outputs, logging."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import logs
import pytest
from comfy_client import _describe_rejection, execution_failure, parse_outcome
from jobs import ClaimedJob, JobFailure, clip_error, is_safe_segment, pending_score, validate_job
from outputs import _relative_subfolder, collect, job_dir, tag_workflow
from worker import Backoff

WF = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x/y"}},
}


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("alice", True),
        ("a_b-C9", True),
        ("../x", False),
        ("/abs", False),
        ("", False),
        ("a\0b", False),
        ("..", False),
        (".", False),
        ("a/b", False),
        (None, False),
        (7, False),
        ("x" * 101, False),
    ],
)
def test_safe_segment(value, safe) -> None:
    assert is_safe_segment(value) is safe


def _job(doc, size=100) -> ClaimedJob:
    return ClaimedJob(id="job-1", doc=doc, raw_size=size)


@pytest.mark.parametrize(
    ("doc", "size", "message"),
    [
        ({"user_id": "u", "workflow": WF}, 10**9, "WORKER_MAX_JOB_BYTES"),
        ({"user_id": "../u", "workflow": WF}, 10, "safe path segment"),
        ({"user_id": "u"}, 10, "no workflow"),
        ({"user_id": "u", "workflow": "text"}, 10, "must be a JSON object"),
        ({"user_id": "u", "workflow": {}}, 10, "empty"),
        ({"user_id": "u", "workflow": {"nodes": []}}, 10, "class_type"),
    ],
)
def test_validate_job_rejects(doc, size, message) -> None:
    with pytest.raises(JobFailure) as info:
        validate_job(_job(doc, size), max_bytes=1000)
    assert message in info.value.message and info.value.kind == "invalid_job"


def test_validate_job_accepts_a_good_job() -> None:
    validate_job(_job({"user_id": "u", "workflow": WF}), max_bytes=1000)


def test_pending_score_matches_the_queue_manager() -> None:
    doc = {"priority": 1, "created_at": "2026-01-01T00:00:00+00:00"}
    assert pending_score(doc) == 1_000_000 + 1767225600
    naive = {"priority": 0, "created_at": "2026-01-01T00:00:00"}
    assert pending_score(naive) == 1767225600


def test_clip_error() -> None:
    assert clip_error("") == "failed"
    assert len(clip_error("x" * 20000)) == 10000


def test_parse_outcome_success_and_timing() -> None:
    entry = {
        "outputs": {"2": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
        "status": {
            "status_str": "success",
            "completed": True,
            "messages": [
                ["execution_start", {"prompt_id": "p", "timestamp": 1000}],
                ["execution_cached", {"nodes": [], "prompt_id": "p", "timestamp": 1001}],
                ["execution_success", {"prompt_id": "p", "timestamp": 1042}],
            ],
        },
    }
    outcome = parse_outcome(entry)
    assert outcome.status == "success" and outcome.execution_ms == 42
    assert "2" in outcome.outputs


def test_parse_outcome_error_and_interrupt() -> None:
    err = {"exception_type": "RuntimeError", "exception_message": "bad", "node_id": "3"}
    entry = {"status": {"status_str": "error", "messages": [["execution_error", err]]}}
    assert parse_outcome(entry).status == "error"
    entry = {"status": {"status_str": "error", "messages": [["execution_interrupted", {}]]}}
    assert parse_outcome(entry).status == "interrupted"


@pytest.mark.parametrize(
    ("exc_type", "message", "kind"),
    [
        ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 20 MiB", "out_of_memory"),
        ("RuntimeError", "Allocation on device 0 would exceed allowed memory", "out_of_memory"),
        ("ValueError", "bad value", "execution_error"),
    ],
)
def test_execution_failure_recognises_oom(exc_type, message, kind) -> None:
    failure = execution_failure(
        {"exception_type": exc_type, "exception_message": message, "node_id": "5", "node_type": "K"}
    )
    assert failure.kind == kind
    assert exc_type in failure.message and "node 5 (K)" in failure.message
    assert failure.result()["node_id"] == "5"


def test_rejection_description_lists_each_node() -> None:
    node_errors = {
        "4": {
            "errors": [
                {"type": "value_not_in_list", "message": "Value not in list", "details": "x"}
            ],
            "class_type": "CheckpointLoaderSimple",
            "dependent_outputs": ["9"],
        }
    }
    text = _describe_rejection({"type": "prompt_outputs_failed_validation"}, node_errors)
    assert "node 4 (CheckpointLoaderSimple): value_not_in_list" in text


def test_tag_workflow_prefixes_string_prefixes_and_refuses_links() -> None:
    tagged = tag_workflow(WF, "j1")
    assert tagged["2"]["inputs"]["filename_prefix"] == "j1/x/y"
    assert WF["2"]["inputs"]["filename_prefix"] == "x/y"  # original untouched
    # A prefix from another node's output could not be checked or tagged before the run.
    wf = {**WF, "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["7", 0]}}}
    with pytest.raises(JobFailure, match="literal string"):
        tag_workflow(wf, "j1")


@pytest.mark.parametrize(
    ("subfolder", "expected"),
    [("", ""), ("j1", ""), ("j1/x", "x"), ("x", "x"), ("j1/a/b", "a/b")],
)
def test_relative_subfolder(subfolder, expected) -> None:
    assert _relative_subfolder(subfolder, "j1") == expected


@pytest.mark.parametrize("subfolder", ["../etc", "j1/../../x", "/abs"])
def test_relative_subfolder_rejects_escapes(subfolder) -> None:
    with pytest.raises(JobFailure):
        _relative_subfolder(subfolder, "j1")


def test_job_dir_refuses_unsafe_segments(tmp_path: Path) -> None:
    assert job_dir(str(tmp_path), "u", "j") == str(tmp_path / "u" / "j")
    for user in ("..", "../x", "", "/etc"):
        with pytest.raises(JobFailure):
            job_dir(str(tmp_path), user, "j")


def test_job_dir_refuses_a_symlinked_user_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "mallory").symlink_to(outside)
    with pytest.raises(JobFailure):
        job_dir(str(root), "mallory", "j")


def test_collect_moves_files_and_writes_text(tmp_path: Path) -> None:
    comfy_out = tmp_path / "comfy"
    (comfy_out / "j1" / "sub").mkdir(parents=True)
    (comfy_out / "j1" / "sub" / "a.png").write_bytes(b"png")
    dest = tmp_path / "dest"
    dest.mkdir()
    outputs = {
        "2": {
            "images": [{"filename": "a.png", "subfolder": "j1/sub", "type": "output"}],
            "animated": [False],
        },
        "5": {"text": ["hello"]},
    }
    listed = asyncio.run(collect(outputs, str(dest), "j1", None, str(comfy_out)))  # type: ignore[arg-type]
    assert (dest / "sub" / "a.png").read_bytes() == b"png"
    assert not (comfy_out / "j1").exists()
    texts = [item for item in listed if item["kind"] == "text"]
    assert texts and Path(texts[0]["path"]).read_text() == "hello"


def test_collect_rejects_unsafe_file_names(tmp_path: Path) -> None:
    outputs = {"2": {"images": [{"filename": "../../etc/passwd", "type": "output"}]}}
    with pytest.raises(JobFailure):
        asyncio.run(collect(outputs, str(tmp_path), "j1", None, str(tmp_path)))  # type: ignore[arg-type]


def test_backoff_is_capped() -> None:
    backoff = Backoff(cap=4)
    assert [backoff.next() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.reset()
    assert backoff.next() == 0.5


def test_state_log_logs_changes_only(caplog) -> None:
    states = logs.StateLog(logging.getLogger("t"))
    with caplog.at_level(logging.INFO, logger="t"):
        for state in ("up", "down", "down", "down", "up", "up"):
            states.set("redis", state, "why")
    assert [r.getMessage() for r in caplog.records] == [
        "redis is up",
        "redis is down: why",
        "redis is up: why",
    ]


def test_json_log_lines_carry_ids(capsys) -> None:
    logs.setup("w-9", "json", "INFO")
    token = logs.job_id_var.set("job-7")
    try:
        logging.getLogger("comfyui_worker").info("hello %s", "there")
    finally:
        logs.job_id_var.reset(token)
        logging.getLogger().handlers.clear()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["worker_id"] == "w-9" and line["job_id"] == "job-7" and line["msg"] == "hello there"
