"""The file exchange's HTTP interface, checked with real requests against the real nginx
running the role's own nginx.conf and token.conf (see exchange_helpers.py).

Each test works in its own participant folder, so the tests do not depend on their order.
"""

from __future__ import annotations

import os
import socket
import time
import zlib

import pytest
from exchange_helpers import MAX_BODY, NGINX, make_token, prepare, start, stop

SECRET = b"outside the exchange: must never be served"


def put_path(user: str, name: str = "image.png", job: str = "job-1") -> str:
    return f"/outputs/{user}/{job}/{name}"


def wait_until_empty(folder, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while (left := sorted(folder.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["none", "wrong", "empty", "basic"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/inputs/auth/photo.png"),
        ("HEAD", "/inputs/auth/photo.png"),
        ("PUT", "/outputs/auth/job-1/new.png"),
        ("GET", "/outputs/auth/job-1/old.png"),
        ("GET", "/elsewhere"),
        ("DELETE", "/outputs/auth/job-1/old.png"),
    ],
)
def test_requests_without_the_token_get_401(exchange, headers, method, path):
    (exchange.inputs / "auth").mkdir(exist_ok=True)
    (exchange.inputs / "auth" / "photo.png").write_bytes(b"participant's photo")
    (exchange.outputs / "auth" / "job-1").mkdir(parents=True, exist_ok=True)
    (exchange.outputs / "auth" / "job-1" / "old.png").write_bytes(b"earlier output")

    body = b"must not land" if method == "PUT" else None
    status, reply_headers, reply = exchange.request(
        method, path, body=body, headers=headers, token=False
    )

    assert status == 401
    assert reply_headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert b"participant's photo" not in reply and b"earlier output" not in reply
    assert not (exchange.outputs / "auth" / "job-1" / "new.png").exists()
    assert (exchange.outputs / "auth" / "job-1" / "old.png").read_bytes() == b"earlier output"


def near_misses(token: str) -> list[str]:
    """Authorization values that differ from the right one in one way each."""
    values = [
        f"Bearer {token}x",
        f"Bearer x{token}",
        f"Bearer {token[:-1]}",
        f"Bearer {token.swapcase()}",
        f"Token {token}",
        f"{token}",
        f"Bearer {token} {token}",
    ]
    # A regex metacharacter of the token left unescaped would let these through.
    for special in ".~+/=":
        if special in token:
            values.append("Bearer " + token.replace(special, "A"))
    return values


def test_near_miss_tokens_get_401(exchange):
    (exchange.inputs / "near").mkdir(exist_ok=True)
    (exchange.inputs / "near" / "a.txt").write_bytes(b"x")
    for value in near_misses(exchange.token):
        status, _, _ = exchange.request(
            "GET", "/inputs/near/a.txt", headers={"Authorization": value}, token=False
        )
        assert status == 401, value


def test_the_token_opens_the_exchange(exchange):
    (exchange.inputs / "open").mkdir(exist_ok=True)
    (exchange.inputs / "open" / "a.txt").write_bytes(b"hello")

    assert exchange.request("GET", "/inputs/open/a.txt")[0] == 200
    # The scheme is case-insensitive (RFC 7235); the token is not.
    lower = {"Authorization": f"bearer {exchange.token}"}
    assert exchange.request("GET", "/inputs/open/a.txt", headers=lower, token=False)[0] == 200
    assert "WWW-Authenticate" not in exchange.request("GET", "/inputs/open/a.txt")[1]
    # Unknown paths: 404 once authorized.
    for path in ("/", "/elsewhere", "/input/open/a.txt", "/outputsx/a"):
        assert exchange.request("GET", path)[0] == 404, path


# --- inputs ---------------------------------------------------------------------------------


def test_get_and_head_serve_inputs_byte_for_byte(exchange):
    data = os.urandom(200_000)
    (exchange.inputs / "alice").mkdir(exist_ok=True)
    (exchange.inputs / "alice" / "upload one.png").write_bytes(data)
    (exchange.inputs / "shared" / "workshop.png").write_bytes(b"workshop material")

    status, headers, body = exchange.request("GET", "/inputs/alice/upload%20one.png")
    assert (status, body) == (200, data)
    assert headers["Content-Type"] == "application/octet-stream"

    status, headers, body = exchange.request("HEAD", "/inputs/alice/upload%20one.png")
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(data))

    assert exchange.request("GET", "/inputs/shared/workshop.png")[2] == b"workshop material"
    assert exchange.request("GET", "/inputs/alice/missing.png")[0] == 404


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "MKCOL", "PATCH", "OPTIONS"])
def test_inputs_are_read_only(exchange, method):
    folder = exchange.inputs / "readonly"
    folder.mkdir(exist_ok=True)
    (folder / "kept.png").write_bytes(b"original")

    for path in ("/inputs/readonly/kept.png", "/inputs/readonly/new.png", "/inputs/readonly/new/"):
        status, _, _ = exchange.request(method, path, body=b"replacement")
        assert status in (403, 405), (method, path, status)

    assert (folder / "kept.png").read_bytes() == b"original"
    assert sorted(p.name for p in folder.iterdir()) == ["kept.png"]


def test_no_directory_listings(exchange):
    (exchange.inputs / "listing").mkdir(exist_ok=True)
    (exchange.inputs / "listing" / "secret-name.png").write_bytes(b"x")
    (exchange.outputs / "listing" / "job-1").mkdir(parents=True, exist_ok=True)
    (exchange.outputs / "listing" / "job-1" / "other-name.png").write_bytes(b"x")

    for path in (
        "/inputs/",
        "/inputs/listing/",
        "/outputs/",
        "/outputs/listing/",
        "/outputs/listing/job-1/",
    ):
        status, _, body = exchange.request("GET", path)
        assert status in (403, 404), path
        assert b"secret-name" not in body and b"other-name" not in body
        assert exchange.request("PROPFIND", path)[0] in (403, 405)


# --- outputs --------------------------------------------------------------------------------


def test_put_creates_the_folders_then_replaces_and_reads_back(exchange):
    first, second = os.urandom(50_000), os.urandom(30_000)
    path = "/outputs/bob/3f2c-job/sub/dir/result_00001_.png"
    target = exchange.outputs / "bob" / "3f2c-job" / "sub" / "dir" / "result_00001_.png"

    assert exchange.request("PUT", path, body=first)[0] == 201
    assert target.read_bytes() == first
    assert exchange.request("PUT", path, body=second)[0] == 204
    assert target.read_bytes() == second

    status, _, body = exchange.request("GET", path)
    assert (status, body) == (200, second)
    status, headers, body = exchange.request("HEAD", path)
    assert (status, body, int(headers["Content-Length"])) == (200, b"", len(second))

    assert oct(target.stat().st_mode & 0o777) == oct(0o664)
    # The body went through the temporary folder and nothing was left there.
    assert wait_until_empty(exchange.body_temp) == []


@pytest.mark.parametrize(
    "path", ["/outputs/carol/flat.png", "/outputs/flat.png", "/outputs/carol/job-1/"]
)
def test_put_outside_user_job_layout_is_refused(exchange, path):
    status, _, _ = exchange.request("PUT", path, body=b"misplaced")
    assert status in (403, 405, 409)
    assert not list(exchange.outputs.rglob("flat.png"))


@pytest.mark.parametrize("method", ["DELETE", "MKCOL", "COPY", "MOVE", "POST", "PATCH", "OPTIONS"])
def test_outputs_refuse_other_methods(exchange, method):
    folder = exchange.outputs / "dave" / "job-1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kept.png").write_bytes(b"delivered")
    headers = {"Destination": "http://exchange/outputs/dave/job-1/moved.png"}

    for path in ("/outputs/dave/job-1/kept.png", "/outputs/dave/job-1/newdir/"):
        status, _, _ = exchange.request(method, path, headers=headers)
        assert status in (403, 405), (method, path, status)

    assert (folder / "kept.png").read_bytes() == b"delivered"
    assert sorted(p.name for p in folder.iterdir()) == ["kept.png"]


def test_a_body_over_the_limit_gets_413_and_leaves_no_file(exchange):
    too_big = b"x" * (MAX_BODY + 1)
    path = put_path("erin", "big.bin")

    assert exchange.request("PUT", path, body=too_big)[0] == 413
    # Without a Content-Length (chunked), nginx counts while reading.
    chunked = iter([too_big[:40_000], too_big[40_000:]])
    status, _, _ = exchange.request("PUT", path, body=chunked, chunked=True)
    assert status == 413

    assert not (exchange.outputs / "erin").exists()
    assert wait_until_empty(exchange.body_temp) == []
    # At the limit it goes through.
    assert exchange.request("PUT", path, body=b"x" * MAX_BODY)[0] == 201


def test_an_interrupted_put_leaves_no_file(exchange):
    target = exchange.outputs / "frank" / "job-1" / "cut.png"
    head = (
        f"PUT /outputs/frank/job-1/cut.png HTTP/1.1\r\nHost: exchange\r\n"
        f"Authorization: Bearer {exchange.token}\r\nContent-Length: 60000\r\n\r\n"
    ).encode()
    with socket.create_connection((exchange.address, exchange.port)) as s:
        s.sendall(head + b"y" * 1000)
        time.sleep(0.3)
        # The partial body sits in the temporary folder, never at the target.
        assert not target.exists()
    assert wait_until_empty(exchange.body_temp) == []
    assert not target.exists()

    # An interrupted replacement keeps the file that was there.
    assert exchange.request("PUT", "/outputs/frank/job-1/cut.png", body=b"complete")[0] == 201
    with socket.create_connection((exchange.address, exchange.port)) as s:
        s.sendall(head + b"z" * 1000)
    assert wait_until_empty(exchange.body_temp) == []
    assert target.read_bytes() == b"complete"


def test_readers_see_the_old_file_until_a_put_completes(exchange):
    path = "/outputs/gina/job-1/swap.png"
    assert exchange.request("PUT", path, body=b"old" * 1000)[0] == 201
    new = os.urandom(20_000)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: exchange\r\nAuthorization: Bearer {exchange.token}\r\n"
        f"Content-Length: {len(new)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((exchange.address, exchange.port), timeout=10) as s:
        s.sendall(head + new[:10_000])
        time.sleep(0.3)
        assert exchange.request("GET", path)[2] == b"old" * 1000
        # The body in transit sits in the temporary folder beside the outputs folder.
        assert len(list(exchange.body_temp.iterdir())) == 1
        s.sendall(new[10_000:])
        assert s.recv(100).startswith(b"HTTP/1.1 204")
    assert exchange.request("GET", path)[2] == new


# --- confinement ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/inputs/../secret.txt",
        "/inputs/../../secret.txt",
        "/inputs/../../../secret.txt",
        "/inputs/..%2f..%2f..%2fsecret.txt",
        "/inputs/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/inputs/alice/../../../../secret.txt",
        "/outputs/../../../secret.txt",
        "/inputs/..\\..\\..\\secret.txt",
        "/inputs//../../../secret.txt",
    ],
)
def test_dot_dot_paths_cannot_escape(exchange, path):
    (exchange.root / "secret.txt").write_bytes(SECRET)
    (exchange.platform / "data" / "secret.txt").write_bytes(SECRET)
    (exchange.platform / "secret.txt").write_bytes(SECRET)

    status, reply = exchange.raw_status("GET", path)
    assert status in (400, 403, 404), (path, status)
    assert SECRET not in reply

    # On Linux a backslash is part of a file name: that PUT may land, but only in its job folder.
    job = f"job-{zlib.crc32(path.encode())}"
    put = path.replace("/inputs/", f"/outputs/dotdot/{job}/").replace("secret", "planted")
    status, _ = exchange.raw_status("PUT", put)
    assert status in (201, 400, 403, 404, 405), (put, status)
    landed = [
        p for p in exchange.root.rglob("*planted.txt") if job in str(p) or "dotdot" not in str(p)
    ]
    assert all(p.parent == exchange.outputs / "dotdot" / job for p in landed), landed
    assert (status == 201) == bool(landed)


def test_symlinks_in_the_trees_are_not_followed(exchange):
    outside = exchange.root / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_bytes(SECRET)
    folder = exchange.inputs / "mallory"
    folder.mkdir(exist_ok=True)
    (folder / "link.png").symlink_to(outside / "secret.txt")
    (folder / "dirlink").symlink_to(outside)
    (exchange.inputs / "shared" / "escape").symlink_to(outside)
    job = exchange.outputs / "mallory" / "job-1"
    job.mkdir(parents=True, exist_ok=True)
    (job / "link.png").symlink_to(outside / "secret.txt")

    for path in (
        "/inputs/mallory/link.png",
        "/inputs/mallory/dirlink/secret.txt",
        "/inputs/shared/escape/secret.txt",
        "/outputs/mallory/job-1/link.png",
    ):
        status, _, body = exchange.request("GET", path)
        assert status in (403, 404), (path, status)
        assert SECRET not in body


# --- the listen address ---------------------------------------------------------------------


def test_only_the_listen_address_answers(tmp_path):
    if not NGINX:
        pytest.skip("nginx is not installed")
    try:
        socket.create_connection(("127.0.0.2", 9), timeout=1).close()
    except ConnectionRefusedError:
        pass
    except OSError as exc:
        pytest.skip(f"127.0.0.2 is not a local address here: {exc}")
    ex = start(prepare(tmp_path, "127.0.0.2", make_token(), MAX_BODY))
    try:
        assert ex.request("GET", "/inputs/x", token=False)[0] == 401
        for other in ("127.0.0.1", "127.0.0.3"):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, ex.port), timeout=2).close()
    finally:
        stop(ex)


# --- the token stays out of the logs and the main configuration -----------------------------


def test_the_token_never_reaches_the_logs(exchange):
    (exchange.inputs / "logs").mkdir(exist_ok=True)
    (exchange.inputs / "logs" / "a.txt").write_bytes(b"x")
    wrong = make_token()
    exchange.request("GET", "/inputs/logs/a.txt")
    exchange.request("GET", "/inputs/logs/missing.txt")
    exchange.request("PUT", "/inputs/logs/a.txt", body=b"refused")
    exchange.request("PUT", put_path("logs"), body=b"x" * (MAX_BODY + 1))
    exchange.request("GET", "/inputs/logs/a.txt", headers={"Authorization": f"Bearer {wrong}"})
    exchange.raw_status("GET", "/inputs/../../etc/passwd")
    time.sleep(0.2)

    logs = exchange.logs_text()
    assert "/inputs/logs/missing.txt" in logs  # the requests were logged...
    assert exchange.token not in logs  # ...without the token
    assert wrong not in logs
    assert exchange.token not in (exchange.etc / "nginx.conf").read_text()
