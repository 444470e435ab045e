"""Configuration: defaults from CONTRACTS.md §4, and errors that name the variable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from config import Config, ConfigError
from worker_testlib import WORKER_DIR


def test_defaults_follow_the_contract() -> None:
    cfg = Config.from_env({})
    assert cfg.comfyui_timeout == 900
    assert cfg.job_timeout == 1800
    assert cfg.queue_manager_timeout == 30
    assert cfg.heartbeat_ttl == 60 and cfg.heartbeat_interval < cfg.heartbeat_ttl / 2
    assert cfg.queue_source == "redis" and cfg.queue_mode == "fifo"
    assert cfg.outputs_dir == "/outputs"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_PORT": "abc"}, "REDIS_PORT"),
        ({"REDIS_PORT": "70000"}, "REDIS_PORT"),
        ({"QUEUE_MODE": "lifo"}, "QUEUE_MODE"),
        ({"QUEUE_SOURCE": "kafka"}, "QUEUE_SOURCE"),
        ({"COMFYUI_URL": "localhost:8188"}, "COMFYUI_URL"),
        ({"WORKER_ID": "a/b"}, "WORKER_ID"),
        ({"OUTPUTS_DIR": "outputs"}, "OUTPUTS_DIR"),
        ({"GPU_INDEX": "-1"}, "GPU_INDEX"),
        ({"COMFYUI_START": "maybe"}, "COMFYUI_START"),
        ({"HEARTBEAT_INTERVAL": "nan"}, "HEARTBEAT_INTERVAL"),
        ({"WORKER_JOB_TIMEOUT": "100", "COMFYUI_TIMEOUT": "900"}, "WORKER_JOB_TIMEOUT"),
        ({"WORKER_JOB_TIMEOUT": "3600"}, "JOB_TIMEOUT"),
        ({"HEARTBEAT_INTERVAL": "40"}, "HEARTBEAT_TTL"),
        ({"COMFYUI_START": "true", "COMFYUI_DIR": "/nonexistent"}, "COMFYUI_DIR"),
        (
            {"COMFYUI_START": "true", "COMFYUI_URL": "http://10.0.0.5:8188"},
            "must be a loopback",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"REDIS_PASSWORD_FILE": "/nonexistent/pw"}, "REDIS_PASSWORD_FILE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert variable in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"REDIS_PORT": "x", "QUEUE_MODE": "y"})
    assert len(info.value.problems) == 2


def test_password_is_not_in_repr(tmp_path) -> None:
    cfg = Config.from_env({"REDIS_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in repr(cfg)
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    assert Config.from_env({"REDIS_PASSWORD_FILE": str(pw)}).redis_password == "from-file"


def test_worker_exits_2_naming_the_variable_and_hiding_the_password() -> None:
    env = {"REDIS_PASSWORD": "topsecret", "QUEUE_MODE": "lifo", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "worker.py"], cwd=WORKER_DIR, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "QUEUE_MODE" in done.stderr and "topsecret" not in done.stderr + done.stdout


def test_check_config_prints_redacted_json() -> None:
    env = {"REDIS_PASSWORD": "topsecret", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "worker.py", "--check-config"],
        cwd=WORKER_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(done.stdout)
    assert doc["redis_password"] == "***" and "topsecret" not in done.stdout
