"""Render the appserver_exchange role's real templates through Ansible and run the real nginx.

The templates go through ansible-playbook with the role's defaults plus test values (the
same `template` module the role uses), into a temporary prefix; nginx then runs from there
as the current user, on a loopback address and a free port.
"""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# tests/, for localplay: comfyui-worker/tests/conftest.py imports this module from outside it.
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from localplay import REPO, Run, run_local_playbook  # noqa: E402

ROLE = REPO / "roles" / "appserver_exchange"
NGINX = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin") or ""
# The body limit tests/exchange runs with (the role's default is 4g).
MAX_BODY = 64 * 1024


def make_token() -> str:
    """A random token holding every character class a token may hold, so a missing regex
    escape in token.conf shows."""
    return secrets.token_urlsafe(24) + ".~+/x=="


def free_port() -> int:
    """A TCP port that nothing listens on, on any address."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def run_playbook(
    workdir: Path, plays: list, variables: dict, *args: str, with_defaults=True
) -> Run:
    """ansible-playbook on localhost; the role's defaults (unless with_defaults is false) and
    then `variables` as extra vars, from a 0600 file."""
    defaults = [ROLE / "defaults" / "main.yml"] if with_defaults else []
    return run_local_playbook(workdir, plays, variables, *args, vars_files=defaults)


def render_templates(workdir: Path, variables: dict, targets: dict[str, Path]) -> None:
    """Render role templates (name -> destination) with the role's defaults plus `variables`."""
    tasks = [
        {
            "name": f"Render {name}",
            "ansible.builtin.template": {
                "src": str(ROLE / "templates" / name),
                "dest": str(dest),
                "mode": "0600",
            },
        }
        for name, dest in targets.items()
    ]
    plays = [{"name": "Render", "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    run = run_playbook(workdir, plays, variables)
    assert run.returncode == 0, run.stdout + run.stderr


@dataclass
class Exchange:
    """One running exchange: its folders, address and token."""

    root: Path
    address: str
    port: int
    token: str
    max_body: int
    process: subprocess.Popen | None = None
    variables: dict = field(default_factory=dict)

    @property
    def platform(self) -> Path:
        return self.root / "platform"

    @property
    def inputs(self) -> Path:
        return self.platform / "data" / "inputs"

    @property
    def outputs(self) -> Path:
        return self.platform / "data" / "outputs"

    @property
    def body_temp(self) -> Path:
        return self.platform / "data" / ".exchange-tmp"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token if token is None else token}"}

    def request(self, method: str, path: str, body=None, headers=None, token=True, chunked=False):
        """One request on a fresh connection; returns (status, headers, body)."""
        all_headers = dict(self.auth() if token is True else {})
        all_headers.update(headers or {})
        conn = http.client.HTTPConnection(self.address, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def raw(self, data: bytes, wait: float = 5.0) -> bytes:
        """Send bytes as they are (no client-side normalisation) and read the reply."""
        with socket.create_connection((self.address, self.port), timeout=wait) as s:
            s.sendall(data)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except TimeoutError:
                pass
            return b"".join(chunks)

    def raw_status(self, method: str, path: str, token: bool = True) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: exchange\r\nConnection: close\r\n"
        if token:
            head += f"Authorization: Bearer {self.token}\r\n"
        reply = self.raw((head + "Content-Length: 0\r\n\r\n").encode())
        status_line = reply.split(b"\r\n", 1)[0].split()
        return int(status_line[1]), reply

    def logs_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def prepare(root: Path, address: str, token: str, max_body: int) -> Exchange:
    """Render the role's nginx.conf and token.conf for a prefix under `root`."""
    port = free_port()
    ex = Exchange(root=root, address=address, port=port, token=token, max_body=max_body)
    for path in (ex.inputs / "shared", ex.outputs, ex.body_temp, ex.etc, ex.logs, root / "state"):
        path.mkdir(parents=True, exist_ok=True)
    ex.variables = {
        "appserver_exchange_token": token,
        "appserver_exchange_listen_address": address,
        "appserver_exchange_port": port,
        "appserver_exchange_user": pwd.getpwuid(os.getuid()).pw_name,
        "_appserver_exchange_group": grp.getgrgid(os.getgid()).gr_name,
        "appserver_exchange_platform_dir": str(ex.platform),
        "appserver_exchange_max_body_size": str(max_body),
        "appserver_exchange_config_dir": str(ex.etc),
        "appserver_exchange_log_dir": str(ex.logs),
        "appserver_exchange_state_dir": str(root / "state"),
        "appserver_exchange_pid_file": str(root / "nginx.pid"),
    }
    render_templates(
        root / "render",
        ex.variables,
        {"nginx.conf.j2": ex.etc / "nginx.conf", "token.conf.j2": ex.etc / "token.conf"},
    )
    return ex


def start(ex: Exchange) -> Exchange:
    conf = str(ex.etc / "nginx.conf")
    test = subprocess.run([NGINX, "-t", "-q", "-c", conf], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    stderr = open(ex.root / "nginx.stderr", "wb")  # noqa: SIM115 - nginx keeps writing to it
    ex.process = subprocess.Popen(
        [NGINX, "-c", conf, "-g", "daemon off;"], stdout=stderr, stderr=stderr
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ex.process.poll() is not None:
            break
        try:
            socket.create_connection((ex.address, ex.port), timeout=0.5).close()
            return ex
        except OSError:
            time.sleep(0.05)
    stop(ex)
    raise AssertionError(
        "nginx did not start: " + (ex.root / "nginx.stderr").read_text() + ex.logs_text()
    )


def stop(ex: Exchange) -> None:
    if ex.process and ex.process.poll() is None:
        ex.process.terminate()
        try:
            ex.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ex.process.kill()
            ex.process.wait()
