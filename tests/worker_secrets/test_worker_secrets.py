"""The worker role's secrets (tasks/secrets.yml, retire-secrets.yml) and environment files
(tasks/env.yml), run through ansible-playbook on localhost against a project folder of the
test's own: each secret is a root-only file the worker reads whole, no rendered file holds one,
the Ansible output shows none even at -vvv with --diff, and what earlier versions left (the
password in .env, the token in a file of the project's user) is gone. The deployed path is
molecule/default/tests/test_secrets.py."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from localplay import REPO, run_local_playbook

sys.path.insert(0, str(REPO / "comfyui-worker"))

from config import Config, read_env_file  # (the worker's folder is on sys.path now)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the role writes root-owned files")

# What Compose's env-file syntax would cut (` #`) or expand (`$`), and quotes.
PASSWORD = "ab #cd$x 'q\" \\z"
TOKEN = "t0k #en$HOME"
PLAY = [
    {
        "name": "Write the workers' secrets and environment files",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [
            {
                "name": "Write the secrets",
                "ansible.builtin.include_role": {"name": "worker", "tasks_from": "secrets"},
            },
            {
                "name": "Render the environment files",
                "ansible.builtin.include_role": {"name": "worker", "tasks_from": "env"},
            },
            # (the workers start here: tasks/up.yml)
            {
                "name": "Remove the secret files the workers no longer use",
                "ansible.builtin.include_role": {"name": "worker", "tasks_from": "retire-secrets"},
            },
        ],
    }
]


class Project:
    """A project folder as a GPU host has it, and the role's two task files run against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "comfyume"
        (self.dir / "comfyui-worker").mkdir(parents=True)

    def run(self, *args: str, **variables: object) -> tuple[int, str, int]:
        """The play's output and its changed= count."""
        extra = {
            "worker_project_dir": str(self.dir),
            "worker_user": "root",
            "worker_group": "root",
            "worker_uid": "1000",
            "worker_instances": 2,
            "worker_gpu_enabled": False,
            "worker_staging_root": str(self.root / "staging"),
            "worker_redis_host": "10.9.8.7",
            "worker_redis_password": PASSWORD,
            "worker_exchange_url": "http://10.9.8.7:8288",
            "worker_exchange_token": TOKEN,
            **variables,
        }
        proc = run_local_playbook(
            self.root, PLAY, extra, *args, timeout=300, secret_vars_file=False
        )
        return proc.returncode, proc.output, proc.changed

    def rendered(self) -> dict[str, str]:
        """Every file the play writes outside the secrets' folder."""
        return {
            str(path.relative_to(self.dir)): path.read_text()
            for path in self.dir.rglob("*")
            if path.is_file() and "secrets" not in path.relative_to(self.dir).parts
        }


class ComposeLoader(yaml.SafeLoader):
    """Reads Compose's own tags (!reset, !override) as the plain values they carry."""


def _untagged(loader: ComposeLoader, _suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)


ComposeLoader.add_multi_constructor("!", _untagged)


def mode_of(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def leaked(text: str) -> list[str]:
    return [name for name, value in (("password", PASSWORD), ("token", TOKEN)) if value in text]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    project = Project(tmp_path)
    # What an earlier version of the role left: the password in .env, the token in a file of
    # the project's user.
    (project.dir / ".env").write_text(f"WORKER_ID=x\nREDIS_PASSWORD={PASSWORD}\n")
    (project.dir / ".exchange-token").write_text(TOKEN + "\n")
    return project


def test_secrets_are_root_only_files_and_nothing_else_holds_them(project):
    rc, out, changed = project.run("-vvv", "--diff")
    assert rc == 0, out[-3000:]
    assert "module_args" in out  # really -vvv
    assert leaked(out) == []

    secrets = project.dir / "secrets"
    assert mode_of(secrets) == (0, 0, 0o700)
    for name, value in (("redis-password", PASSWORD), ("exchange-token", TOKEN)):
        assert mode_of(secrets / name) == (0, 0, 0o400), name
        assert (secrets / name).read_text() == value + "\n", name
    assert not (project.dir / ".exchange-token").exists()

    files = project.rendered()
    assert set(files) == {
        ".env",
        "comfyui-worker/.env",
        "comfyui-worker/docker-compose.workers.yml",
    }
    for name, text in files.items():
        assert leaked(text) == [], name

    # The .env names the files as the containers see them; the stale password line is gone.
    env, problems = read_env_file(files[".env"])
    assert problems == []
    assert "REDIS_PASSWORD" not in env and "FILE_EXCHANGE_TOKEN" not in env
    assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
    assert env["FILE_EXCHANGE_TOKEN_FILE"] == "/run/secrets/exchange-token"
    assert "WORKER_ID=x" not in files[".env"].splitlines()

    # The worker reads each secret whole, through the files Compose mounts at those paths.
    compose_env, _ = read_env_file(files["comfyui-worker/.env"])
    assert compose_env["WORKER_SECRETS_DIR"] == str(secrets)
    workers = yaml.load(files["comfyui-worker/docker-compose.workers.yml"], ComposeLoader)
    workers = workers["services"]
    for n in (1, 2):
        token_mount = f"{secrets}/exchange-token:/run/secrets/exchange-token:ro"
        assert token_mount in workers[f"worker-{n}"]["volumes"], n
    mounted = {
        "/run/secrets/redis-password": f"{compose_env['WORKER_SECRETS_DIR']}/redis-password",
        "/run/secrets/exchange-token": f"{secrets}/exchange-token",
    }
    cfg = Config.from_env(
        {
            **env,
            "REDIS_PASSWORD_FILE": mounted[env["REDIS_PASSWORD_FILE"]],
            "FILE_EXCHANGE_TOKEN_FILE": mounted[env["FILE_EXCHANGE_TOKEN_FILE"]],
        }
    )
    assert (cfg.redis_password, cfg.exchange_token) == (PASSWORD, TOKEN)

    # Unchanged on the next run.
    rc, out, changed = project.run()
    assert (rc, changed) == (0, 0), out[-3000:]


def test_a_token_no_worker_mounts_is_removed(project):
    rc, out, _ = project.run()
    assert rc == 0, out[-3000:]
    rc, out, _ = project.run("-vvv", "--diff", worker_output_delivery="local")
    assert rc == 0, out[-3000:]
    assert leaked(out) == []
    assert not (project.dir / "secrets" / "exchange-token").exists()
    assert (project.dir / "secrets" / "redis-password").read_text() == PASSWORD + "\n"
    assert "FILE_EXCHANGE_TOKEN_FILE" not in (project.dir / ".env").read_text()


def test_docker_compose_mounts_the_password_read_only_and_never_an_empty_folder():
    """docker-compose.yml itself (the manual start's file), for worker-1 and, through
    `extends`, every other worker."""
    compose = yaml.safe_load((REPO / "comfyui-worker" / "docker-compose.yml").read_text())
    service = compose["services"]["worker-1"]
    [mount] = [
        v
        for v in service["volumes"]
        if isinstance(v, dict) and v["target"] == "/run/secrets/redis-password"
    ]
    assert mount == {
        "type": "bind",
        "source": "${WORKER_SECRETS_DIR:-../secrets}/redis-password",
        "target": "/run/secrets/redis-password",
        "read_only": True,
        "bind": {"create_host_path": False},
    }
    assert service["cap_drop"] == ["ALL"]
    assert sorted(service["cap_add"]) == ["KILL", "SETGID", "SETUID"]
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert "user" not in service  # the image's worker starts as root and drops (privileges.py)
