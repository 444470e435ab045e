"""Configuration: defaults from CONTRACTS.md §4, and errors that name the variable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from config import Config, ConfigError, read_env_file
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


def test_a_password_file_keeps_what_an_env_file_would_cut(tmp_path) -> None:
    """Compose's env-file syntax ends an unquoted value at ` #` and expands `$`: a password
    given as REDIS_PASSWORD there reaches the worker cut short. Read from its file, whole."""
    password = "ab #cd$x"
    assert read_env_file(f"REDIS_PASSWORD={password}\n")[0]["REDIS_PASSWORD"] == "ab"
    pw = tmp_path / "redis-password"
    pw.write_text(password + "\n")  # as the play writes it
    token = tmp_path / "exchange-token"
    token.write_text("t0k #en$HOME'\"\n")
    cfg = Config.from_env({"REDIS_PASSWORD_FILE": str(pw), "FILE_EXCHANGE_TOKEN_FILE": str(token)})
    assert cfg.redis_password == password
    assert cfg.exchange_token == "t0k #en$HOME'\""


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, ""), ("comfy", "comfy"), (" comfy ", "comfy"), ("", None), ("a b", None)],
)
def test_worker_user_is_unset_or_an_account_name(value, expected) -> None:
    """The image sets WORKER_USER=comfy; set but empty would run ComfyUI as root, so it is
    refused like any other bad value."""
    env = {} if value is None else {"WORKER_USER": value}
    if expected is None:
        with pytest.raises(ConfigError, match=r"WORKER_USER: .* is not an account name"):
            Config.from_env(env)
    else:
        assert Config.from_env(env).worker_user == expected


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


# ---- config.py --check: the play's check of the rendered .env, on the controller ------------

ENV_FILE = """\
# Ansible managed
WORKER_ID=verda-sim-worker-1
REDIS_HOST=10.0.0.1
REDIS_PORT=6379
REDIS_PASSWORD=pw-Secret-1234
HEARTBEAT_TTL=60
HEARTBEAT_INTERVAL=15
OUTPUT_DELIVERY=exchange
FILE_EXCHANGE_URL=http://100.64.0.1:8288
FILE_EXCHANGE_TOKEN_FILE=/run/secrets/exchange-token
"""


def check(text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python3 config.py --check -` with the file on stdin, as the play runs it."""
    return subprocess.run(
        [sys.executable, "config.py", "--check", "-", *args],
        cwd=WORKER_DIR,
        input=text,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_env_files_are_read_as_compose_reads_simple_values() -> None:
    env, problems = read_env_file(
        "# a comment\n"
        "\n"
        "  A=1\n"
        "export B = two words \n"
        "C=value # a comment\n"
        "D='single # kept'\n"
        'E="double \\"quoted\\"\\n" # gone\n'
        "F=\n"
        "A=again\n"
    )
    assert problems == []
    assert env == {
        "A": "again",
        "B": "two words",
        "C": "value",
        "D": "single # kept",
        "E": 'double "quoted"\n',
        "F": "",
    }


def test_a_broken_line_is_named_by_its_number_never_by_its_text() -> None:
    _, problems = read_env_file("A=1\nhunter2 tail of a password\nB='open\n")
    assert problems == [
        "line 2 is not NAME=VALUE (a value with a line break?)",
        "line 3: a quoted value does not end on its line",
    ]


def test_a_good_env_file_passes_with_exit_0() -> None:
    done = check(ENV_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accepts" in done.stdout


def test_an_env_file_on_disk_is_read_too(tmp_path) -> None:
    path = tmp_path / "project.env"
    path.write_text(ENV_FILE.replace("REDIS_PORT=6379", "REDIS_PORT=70000"))
    done = subprocess.run(
        [sys.executable, "config.py", "--check", str(path)],
        cwd=WORKER_DIR,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "REDIS_PORT: 70000 is outside 1..65535" in done.stdout


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("HEARTBEAT_INTERVAL=15", "HEARTBEAT_INTERVAL=40"), "HEARTBEAT_INTERVAL (40) must be"),
        (("REDIS_HOST=10.0.0.1", "REDIS_HOST="), "REDIS_HOST: empty"),
        (("REDIS_PORT=6379", "REDIS_PORT=70000"), "REDIS_PORT: 70000 is outside 1..65535"),
        (("HEARTBEAT_TTL=60", "HEARTBEAT_TTL=-5"), "HEARTBEAT_TTL: -5 is outside"),
        (("FILE_EXCHANGE_URL=http://100.64.0.1:8288", "FILE_EXCHANGE_URL=http://:8288"), "FILE_"),
    ],
)
def test_what_the_worker_refuses_exits_2_naming_the_variable(change, expected) -> None:
    done = check(ENV_FILE.replace(*change))
    assert done.returncode == 2
    assert expected in done.stdout
    assert "pw-Secret-1234" not in done.stdout + done.stderr


def test_secret_values_never_reach_the_output() -> None:
    # A value the worker quotes in its message, equal to the password, is hidden.
    done = check(ENV_FILE + "WORKER_ID=pw-Secret-1234/x\n")
    assert done.returncode == 2
    assert "WORKER_ID: '***/x' must be" in done.stdout
    assert "pw-Secret-1234" not in done.stdout + done.stderr


def test_files_on_the_gpu_host_are_not_looked_for() -> None:
    """The token file and ComfyUI's folder exist on the GPU host, not on the controller;
    the loopback rule of COMFYUI_START still holds."""
    started = ENV_FILE + "COMFYUI_START=true\nCOMFYUI_DIR=/nonexistent/ComfyUI\n"
    assert check(started).returncode == 0
    exposed = started + "COMFYUI_URL=http://10.0.0.5:8188\n"
    done = check(exposed)
    assert done.returncode == 2 and "must be a loopback address" in done.stdout
    assert "main.py" not in done.stdout


def test_an_unreadable_file_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "config.py", "--check", "/nonexistent/project.env"],
        cwd=WORKER_DIR,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "cannot read it" in done.stdout
