"""What the verify steps of the simulated scenarios share: running the real playbooks
against the simulated hosts, reading their recaps, and reaching their containers and Redis.

testinfra reaches the hosts through docker exec; `run_playbook` runs ansible-playbook from
the repository root with the inventory the scenario names.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("COMFYUME_SIM_STATE", "/var/lib/comfyume-sim"))


@dataclass
class PlaybookRun:
    rc: int
    output: str

    @property
    def flat(self) -> str:
        """The output with Ansible's YAML line wrapping undone, for finding a message."""
        return " ".join(self.output.split())


def run_playbook(
    inventory: Path, playbook: str | Path, *args: str, timeout: int = 900, env: dict | None = None
) -> PlaybookRun:
    """Run ansible-playbook from the repository root against the simulated hosts."""
    overrides = env or {}
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
    )
    env.update(overrides)
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(playbook), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


RECAP_LINE = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>ok=\d+.*)$")


def recap(output: str) -> dict[str, dict[str, int]]:
    """Parse the PLAY RECAP lines into {host: {ok: n, changed: n, ...}}."""
    hosts: dict[str, dict[str, int]] = {}
    for line in output.splitlines():
        match = RECAP_LINE.match(line.strip())
        if match:
            counts = (item.split("=", 1) for item in match["counts"].split())
            hosts[match["host"]] = {k: int(v) for k, v in counts}
    return hosts


def inspect(host, name: str) -> dict:
    """`docker inspect` of one container on a simulated host."""
    return json.loads(host.check_output(f"docker inspect {name}"))[0]


def container_address(name: str) -> str:
    """A simulated host's address on its scenario's main network (the first, by name)."""
    return subprocess.run(
        [
            "docker",
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]


def redis_password() -> str:
    return (STATE_DIR / "redis-password").read_text().split()[0]


def redis_client(app_server: str):
    import redis

    return redis.Redis(
        container_address(app_server), 6379, password=redis_password(), socket_timeout=10
    )
