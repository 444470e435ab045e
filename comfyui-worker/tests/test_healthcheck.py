"""healthcheck.py, run as Docker runs it: a health file written by hand, and a local HTTP server
standing in for ComfyUI's /system_stats. A worker whose queue is unreachable is a live container
(exit 0) that says so, distinct from one that is healthy and idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HEALTHCHECK = Path(__file__).parents[1] / "healthcheck.py"


class _SystemStats(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        found = self.path == "/system_stats"
        body = b'{"system": {}, "devices": []}' if found else b"{}"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def comfyui_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SystemStats)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def healthcheck(health_file: Path, comfyui_url: str, **doc: object) -> tuple[int, str]:
    """Write the health file as the worker's health loop does, then run the check."""
    health_file.write_text(json.dumps({"ts": time.time(), "out_of_service": None, **doc}))
    env = {
        **os.environ,
        "HEALTH_FILE": str(health_file),
        "HEALTH_MAX_AGE": "60",
        "COMFYUI_URL": comfyui_url,
    }
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stdout.strip()


def test_an_unreachable_queue_is_healthy_and_says_so(tmp_path, comfyui_url):
    assert healthcheck(tmp_path / "health", comfyui_url, state="queue_unreachable") == (
        0,
        "healthy; queue unreachable",
    )


@pytest.mark.parametrize("state", ["idle", "running", "starting", "vram_wait"])
def test_a_healthy_worker_names_its_state(tmp_path, comfyui_url, state):
    assert healthcheck(tmp_path / "health", comfyui_url, state=state) == (0, f"healthy; {state}")


def test_an_unreachable_queue_does_not_hide_a_comfyui_that_does_not_answer(tmp_path, comfyui_url):
    rc, out = healthcheck(tmp_path / "health", comfyui_url + "/gone", state="queue_unreachable")
    assert rc == 1
    assert out.startswith("unhealthy: ComfyUI: ") and "does not answer" in out


def test_a_stale_health_file_is_unhealthy_whatever_its_state(tmp_path, comfyui_url):
    rc, out = healthcheck(
        tmp_path / "health", comfyui_url, state="queue_unreachable", ts=time.time() - 600
    )
    assert rc == 1
    assert out.startswith("unhealthy: worker loop: health file is")
