"""The app server's Redis answers the GPU host with the password, and only with it."""

from __future__ import annotations

import subprocess

import pytest
from conftest import GPU_HOST

# A plain RESP exchange from the GPU host, so no Redis client has to be installed
# there: it prints each reply line.
PROBE = r"""
import socket, sys
host, password = sys.argv[1], sys.stdin.read().strip()
s = socket.create_connection((host, 6379), timeout=5)
def cmd(*parts):
    s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    return s.recv(4096).decode().strip()
if password:
    print(cmd(b"AUTH", password.encode()))
print(cmd(b"PING"))
"""


@pytest.fixture(scope="module")
def redis_address(app_host) -> str:
    return app_host.check_output("hostname -I").split()[0]


def probe(address: str, password: str) -> subprocess.CompletedProcess:
    """Run PROBE on the GPU host; the password travels on stdin, never in argv."""
    return subprocess.run(
        ["docker", "exec", "-i", GPU_HOST, "python3", "-c", PROBE, address],
        input=password,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ping_with_password_answers_pong(redis_address, redis_password):
    out = probe(redis_address, redis_password)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["+OK", "+PONG"]


def test_ping_without_password_is_refused(redis_address):
    out = probe(redis_address, "")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("-NOAUTH")


def test_password_is_not_on_the_app_servers_command_line(app_host, redis_password):
    assert redis_password not in app_host.check_output("ps -eo args")
