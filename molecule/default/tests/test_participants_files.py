"""Participants' files through the app server's exchange (real nginx on the simulated app
server): an upload is read by the job, its output is delivered before "completed", nobody
reads anybody else's files, and the exchange answers only on the tailnet with its token."""

from __future__ import annotations

import base64
import json
import sys
import time

import pytest
import submit_job
from conftest import REPO, inspect

sys.path.insert(0, str(REPO / "comfyui-worker" / "tests"))
from worker_testlib import png  # a real PNG, as a frontend upload is

APP_DATA = "/home/dev/comfyume/data"
PORT = 8288


def upload(app_host, path: str, data: bytes) -> None:
    """Put a file into the app server's inputs folder as the platform's frontend would."""
    encoded = base64.b64encode(data).decode()
    app_host.check_output(
        f"install -d -o dev -g dev $(dirname {path}) && echo {encoded} | base64 -d > {path}"
        f" && chown dev:dev {path}"
    )


def load_and_save(image: str, prefix: str = "p") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def tailnet_address(app_host) -> str:
    return app_host.check_output(
        "ip -o -4 addr show tailscale0 | awk '{ split($4, a, \"/\"); print a[1] }'"
    )


def other_address(app_host) -> str:
    return app_host.check_output(
        'ip -o -4 addr show | awk \'$2 != "lo" && $2 != "tailscale0" '
        '{ split($4, a, "/"); print a[1]; exit }\''
    )


def curl_status(gpu_host, url: str, token: str | None) -> str:
    header = f"-H 'Authorization: Bearer {token}'" if token is not None else ""
    out = gpu_host.run(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {header} {url}")
    return out.stdout.strip() if out.rc == 0 else f"curl-exit-{out.rc}"


@pytest.fixture(scope="module")
def alice_output(app_host, redis_client):
    """A participant's upload, a LoadImage -> SaveImage job of hers, and where it landed."""
    data = png(16, 8, (200, 30, 60))
    upload(app_host, f"{APP_DATA}/inputs/alice/day1/photo.png", data)
    job_id = submit_job.enqueue(redis_client, load_and_save("day1/photo.png"), "alice")
    doc = submit_job.wait(redis_client, job_id, timeout=120)
    return job_id, doc


def test_an_upload_is_read_and_the_output_delivered_before_completed(
    alice_output, gpu_host, app_host
):
    job_id, doc = alice_output
    assert doc["status"] == "completed", doc
    [output] = doc["result"]["outputs"]
    assert output["path"].startswith(f"alice/{job_id}/")
    delivered = app_host.file(f"{APP_DATA}/outputs/{output['path']}")
    assert delivered.exists and delivered.size == output["size"]
    assert delivered.sha256sum == output["sha256"]
    # The loaded image made it through: the saved PNG is 16 x 8.
    size = app_host.check_output(
        f"python3 -c \"import struct; d = open('{delivered.path}', 'rb').read(24); "
        "print(*struct.unpack('>II', d[16:24]))\""
    )
    assert size == "16 8"
    # Nothing of the job stays on the GPU host: no staged input, no output copy.
    left = gpu_host.run(f"find /mnt/scratch -path '*{job_id}*'").stdout.strip()
    assert left == ""
    assert "/mnt" not in str(doc["result"]) and "/staging" not in str(doc["result"])


@pytest.mark.parametrize(
    "attack",
    [
        "{root}/outputs/alice/{job}/{name}",
        "/outputs/alice/{job}/{name}",
        "../alice/day1/photo.png",
        "alice/{job}/{name} [output]",
        "{name} [output]",
    ],
)
def test_another_participant_cannot_read_her_files(
    attack, alice_output, app_host, gpu_host, redis_client
):
    job_id, doc = alice_output
    name = doc["result"]["outputs"][0]["filename"]
    value = attack.format(root=APP_DATA, job=job_id, name=name)
    before = app_host.run(f"find {APP_DATA}/outputs/bob 2>/dev/null | sort").stdout
    bob_job = submit_job.enqueue(redis_client, load_and_save(value), "bob")
    bob = submit_job.wait(redis_client, bob_job, timeout=60)
    assert bob["status"] == "failed", bob
    assert "node 1 (LoadImage) input 'image'" in bob["error"], bob["error"]
    assert app_host.run(f"find {APP_DATA}/outputs/bob 2>/dev/null | sort").stdout == before
    assert gpu_host.run(f"find /mnt/scratch -path '*{bob_job}*'").stdout.strip() == ""


def test_a_missing_upload_fails_naming_it(redis_client):
    job_id = submit_job.enqueue(redis_client, load_and_save("nothere.png"), "alice")
    doc = submit_job.wait(redis_client, job_id, timeout=60)
    assert doc["status"] == "failed"
    assert "'nothere.png' is not among your uploads" in doc["error"], doc["error"]


def test_workshop_material_in_shared_is_readable_by_everyone(app_host, redis_client):
    upload(app_host, f"{APP_DATA}/inputs/shared/logo.png", png(4, 4, (0, 0, 255)))
    job_id = submit_job.enqueue(redis_client, load_and_save("shared/logo.png"), "carol")
    doc = submit_job.wait(redis_client, job_id, timeout=60)
    assert doc["status"] == "completed", doc
    assert app_host.file(f"{APP_DATA}/outputs/carol/{job_id}").is_directory


def test_exchange_wants_the_token(gpu_host, app_host, sim_state_dir):
    url = f"http://{tailnet_address(app_host)}:{PORT}/inputs/alice/day1/photo.png"
    token = (sim_state_dir / "exchange-token").read_text().split()[0]
    assert curl_status(gpu_host, url, None) == "401"
    assert curl_status(gpu_host, url, "wrong-" + token) == "401"
    assert curl_status(gpu_host, url, token) == "200"


def test_exchange_answers_only_on_the_tailnet_address(gpu_host, app_host, sim_state_dir):
    token = (sim_state_dir / "exchange-token").read_text().split()[0]
    url = f"http://{other_address(app_host)}:{PORT}/inputs/alice/day1/photo.png"
    assert curl_status(gpu_host, url, token) == "curl-exit-7"  # connection refused
    listening = app_host.check_output(f"ss -Hltn 'sport = :{PORT}' | awk '{{print $4}}'")
    assert listening.split() == [f"{tailnet_address(app_host)}:{PORT}"]


def test_firewall_admits_the_exchange_only_on_tailscale0(app_host):
    rules = app_host.check_output("ufw show added")
    assert f"ufw allow in on tailscale0 to any port {PORT} proto tcp" in rules, rules


def test_workers_mount_only_their_own_staging_folder(gpu_host):
    for n in (1, 2):
        info = inspect(gpu_host, f"worker-{n}")
        mounts = {m["Destination"]: m["Source"] for m in info["Mounts"]}
        assert set(mounts) == {
            "/staging",
            "/models",
            "/run/secrets/exchange-token",
            "/run/secrets/redis-password",
        }, mounts
        assert mounts["/staging"] == f"/mnt/scratch/temp/staging/worker-{n}"
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        assert env["OUTPUT_DELIVERY"] == "exchange"
        assert "FILE_EXCHANGE_TOKEN" not in env
        assert info["HostConfig"]["Memory"] > 0
        assert info["HostConfig"]["PidsLimit"] == 4096
    token = gpu_host.file("/home/dev/comfyume/secrets/exchange-token")
    assert (token.user, token.group, token.mode) == ("root", "root", 0o400)


def test_a_job_survives_an_exchange_outage(app_host, redis_client):
    app_host.check_output("systemctl stop comfyume-exchange")
    try:
        workflow = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "o"},
            },
        }
        job_id = submit_job.enqueue(redis_client, workflow, "dave")
        time.sleep(6)
        # ComfyUI is long done; the job waits for its delivery, never "completed" without it.
        assert json.loads(redis_client.get(f"job:{job_id}"))["status"] == "running"
    finally:
        app_host.check_output("systemctl start comfyume-exchange")
    doc = submit_job.wait(redis_client, job_id, timeout=120)
    assert doc["status"] == "completed", doc
    [output] = doc["result"]["outputs"]
    assert app_host.file(f"{APP_DATA}/outputs/{output['path']}").sha256sum == output["sha256"]
