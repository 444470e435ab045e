"""The GPU host joined the (simulated) tailnet through the tailscale role."""

from __future__ import annotations

import json


def test_node_is_online_with_its_hostname_and_tags(gpu_host):
    assert gpu_host.service("tailscaled").is_running
    status = json.loads(gpu_host.check_output("tailscale status --json"))
    assert status["BackendState"] == "Running"
    assert status["Self"]["HostName"] == "verda-sim"
    assert "tag:comfyume-gpu" in (status["Self"].get("Tags") or [])


def test_auth_key_never_reached_a_command_line(gpu_host, sim_state_dir):
    key = (sim_state_dir / "tailscale-authkey").read_text().split()[0]
    calls = gpu_host.check_output("cat /var/log/tailscale-double/calls.log")
    assert "--auth-key=file:" in calls
    assert key not in calls
    assert key not in gpu_host.check_output("ps -eo args")
