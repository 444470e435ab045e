"""Docker engine and Compose v2 on the simulated GPU host."""

from __future__ import annotations

import json

COMPOSE = """\
services:
  probe:
    image: comfyume-probe:latest
    command: ["/tini", "--version"]
"""


def test_engine_is_active_and_enabled(gpu_host):
    docker = gpu_host.service("docker")
    assert docker.is_running
    assert docker.is_enabled


def test_daemon_json_is_valid_and_has_no_gpu_runtime_without_a_gpu(gpu_host):
    config = json.loads(gpu_host.file("/etc/docker/daemon.json").content_string)
    assert config["log-driver"] == "json-file"
    assert "runtimes" not in config
    # A port published without an address (`-p 8080:80`) binds loopback only.
    assert config["ip"] == "127.0.0.1"


def test_compose_v2_runs_a_service(gpu_host):
    """Build a one-file image from a static binary and run it through docker compose."""
    script = f"""
set -e
dir=$(mktemp -d)
cp /usr/bin/tini-static "$dir/tini"
tar -C "$dir" -c tini | docker import - comfyume-probe:latest >/dev/null
cat > "$dir/compose.yml" <<'YAML'
{COMPOSE}YAML
docker compose -f "$dir/compose.yml" -p comfyume-probe run --rm probe
docker compose -f "$dir/compose.yml" -p comfyume-probe down --rmi all >/dev/null 2>&1
rm -rf "$dir"
"""
    out = gpu_host.run("bash -c %s", script)
    assert out.rc == 0, out.stderr
    assert "tini version" in out.stdout
