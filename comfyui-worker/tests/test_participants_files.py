"""Participants' files end to end: `python worker.py`, real redis-server, ComfyUI (stand-in, and
real v0.11.0 when COMFYUI_SOURCE is set), and the app server's exchange as the role renders it
(real nginx). An upload is fetched into the job's own folder, the output is delivered and read
back before "completed", and nothing of another participant can be read."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from worker_testlib import COMFYUI_KINDS, image_workflow, png, submit, wait_for, wait_job

pytestmark = pytest.mark.integration
both = pytest.mark.parametrize("comfyui_kind", COMFYUI_KINDS)


def load_and_save(image: str, prefix: str = "p") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def size_of(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


ATTACKS = [
    "{outputs}/alice/{job}/{name}",
    "../alice/photo.png",
    "alice/{job}/{name} [output]",
    "{name} [output]",
    "x.png [temp]",
]


# -- OUTPUT_DELIVERY=local: a single host whose data/ the app server reads -----------------------


@pytest.fixture
def participants(comfyui) -> Path:
    root = comfyui.base_dir / "participants"
    (root / "alice" / "day1").mkdir(parents=True, exist_ok=True)
    (root / "shared").mkdir(exist_ok=True)
    (root / "alice" / "day1" / "photo.png").write_bytes(png(16, 8, (200, 30, 60)))
    (root / "alice" / "photo.png").write_bytes(png(4, 4, (1, 2, 3)))
    (root / "shared" / "logo.png").write_bytes(png(6, 2, (0, 0, 255)))
    return root


@both
def test_local_upload_is_loaded_from_the_jobs_own_folder(
    r, comfyui, participants, worker_env, start_worker
):
    start_worker(worker_env)
    job_id = submit(r, load_and_save("day1/photo.png"))
    doc = wait_job(r, job_id)
    assert doc["status"] == "completed", doc
    [output] = doc["result"]["outputs"]
    assert size_of(comfyui.outputs_root / output["path"]) == (16, 8)
    # The job's input folder is gone once the job is done.
    assert not (comfyui.base_dir / "inputs" / job_id).exists()
    shared = wait_job(r, submit(r, load_and_save("shared/logo.png"), user_id="bob"))
    assert shared["status"] == "completed", shared


@both
@pytest.mark.parametrize("attack", ATTACKS)
def test_local_attack_on_another_participant_fails_and_writes_nothing(
    r, comfyui, participants, worker_env, start_worker, attack
):
    start_worker(worker_env)
    first = wait_job(r, submit(r, load_and_save("photo.png")))
    assert first["status"] == "completed", first
    name = first["result"]["outputs"][0]["filename"]
    value = attack.format(outputs=comfyui.outputs_root, job=first["id"], name=name)
    mallory = f"mallory-{uuid.uuid4().hex[:8]}"
    doc = wait_job(r, submit(r, load_and_save(value), user_id=mallory))
    assert doc["status"] == "failed", doc
    assert "node 1 (LoadImage) input 'image'" in doc["error"]
    assert not (comfyui.outputs_root / mallory).exists()


# -- OUTPUT_DELIVERY=exchange: the app server's exchange (real nginx, the role's config) ---------


@pytest.fixture
def exchange_env(exchange, worker_env, tmp_path):
    token_file = tmp_path / "exchange-token"
    token_file.write_text(exchange.token + "\n")
    env = dict(worker_env)
    env.update(
        OUTPUT_DELIVERY="exchange",
        FILE_EXCHANGE_URL=exchange.url,
        FILE_EXCHANGE_TOKEN_FILE=str(token_file),
        OUTPUT_DELIVERY_TIMEOUT="20",
        STAGING_DIR=str(tmp_path / "staging"),
        STAGING_HOST_DIR="/mnt/scratch/temp/staging/worker-1",
    )
    env.pop("OUTPUTS_DIR")
    env.pop("INPUTS_DIR")
    return env


def upload(exchange, path: str, data: bytes) -> None:
    target = exchange.inputs / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


@both
def test_exchange_upload_in_output_delivered_before_completed(
    r, comfyui, exchange, exchange_env, start_worker, tmp_path
):
    upload(exchange, "alice/day1/photo.png", png(16, 8, (200, 30, 60)))
    worker = start_worker(exchange_env)
    job_id = submit(r, load_and_save("day1/photo.png"))
    doc = wait_job(r, job_id)
    assert doc["status"] == "completed", doc
    [output] = doc["result"]["outputs"]
    delivered = exchange.outputs / output["path"]
    assert output["path"] == f"alice/{job_id}/{output['filename']}"
    assert hashlib.sha256(delivered.read_bytes()).hexdigest() == output["sha256"]
    assert size_of(delivered) == (16, 8)
    # Nothing of the job is left in the worker's staging folder or ComfyUI's input folder.
    staging = tmp_path / "staging"
    assert [p for p in staging.rglob("*") if job_id in str(p)] == []
    assert not (comfyui.base_dir / "inputs" / job_id).exists()
    assert exchange.token not in worker.log()


@both
@pytest.mark.parametrize("attack", ATTACKS)
def test_exchange_attack_on_another_participant_fails_and_writes_nothing(
    r, comfyui, exchange, exchange_env, start_worker, attack
):
    upload(exchange, "alice/photo.png", png(4, 4, (1, 2, 3)))
    start_worker(exchange_env)
    first = wait_job(r, submit(r, load_and_save("photo.png")))
    assert first["status"] == "completed", first
    name = first["result"]["outputs"][0]["filename"]
    value = attack.format(outputs=exchange.outputs, job=first["id"], name=name)
    doc = wait_job(r, submit(r, load_and_save(value), user_id="bob"))
    assert doc["status"] == "failed", doc
    assert "node 1 (LoadImage) input 'image'" in doc["error"]
    assert not (exchange.outputs / "bob").exists()
    assert str(comfyui.base_dir) not in doc["error"]


def test_missing_upload_fails_naming_node_input_and_file(r, exchange, exchange_env, start_worker):
    start_worker(exchange_env)
    doc = wait_job(r, submit(r, load_and_save("sub/nothere.png")))
    assert doc["status"] == "failed"
    assert doc["error"] == (
        "node 1 (LoadImage) input 'image': 'sub/nothere.png' is not among your uploads on the "
        "app server (inputs/alice/sub/nothere.png)"
    )


def test_exchange_outage_delays_completed_until_delivered(r, exchange, exchange_env, start_worker):
    exchange.stop()
    start_worker(exchange_env)
    job_id = submit(r, image_workflow())
    time.sleep(3)
    assert r.zscore("queue:running", job_id) is not None  # ComfyUI is done; delivery waits
    exchange.start()
    doc = wait_job(r, job_id, t=30)
    assert doc["status"] == "completed", doc
    assert (exchange.outputs / doc["result"]["outputs"][0]["path"]).is_file()


def test_undeliverable_outputs_fail_the_job_saying_where_they_are(
    r, exchange, exchange_env, start_worker, tmp_path
):
    exchange.stop()
    exchange_env["OUTPUT_DELIVERY_TIMEOUT"] = "2"
    start_worker(exchange_env)
    job_id = submit(r, image_workflow())
    doc = wait_job(r, job_id, t=30)
    assert doc["status"] == "failed"
    where = f"/mnt/scratch/temp/staging/worker-1/undelivered/alice/{job_id}"
    assert where in doc["error"], doc["error"]
    kept = list((tmp_path / "staging" / "undelivered" / "alice" / job_id).iterdir())
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"\x89PNG")


def test_a_wrong_token_fails_the_job_without_retrying(r, exchange, exchange_env, start_worker):
    Path(exchange_env["FILE_EXCHANGE_TOKEN_FILE"]).write_text("not-the-token\n")
    start_worker(exchange_env)
    started = time.monotonic()
    doc = wait_job(r, submit(r, image_workflow()), t=30)
    assert doc["status"] == "failed"
    assert "refused the token" in doc["error"]
    assert time.monotonic() - started < 15  # not the 20 s of OUTPUT_DELIVERY_TIMEOUT


def test_output_over_the_cap_fails_naming_it(r, exchange, exchange_env, start_worker):
    exchange_env["OUTPUT_MAX_FILE_BYTES"] = "10"
    start_worker(exchange_env)
    doc = wait_job(r, submit(r, image_workflow()))
    assert doc["status"] == "failed"
    assert "over OUTPUT_MAX_FILE_BYTES (10)" in doc["error"]
    assert not (exchange.outputs / "alice").exists()


def test_exchange_answers_nobody_without_the_token(exchange):
    upload(exchange, "alice/x.png", b"x")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{exchange.url}/inputs/alice/x.png", timeout=5)
    assert info.value.code == 401
    wait_for(lambda: os.path.exists(exchange.access_log), 5, "the access log")
    assert exchange.token not in Path(exchange.access_log).read_text()
