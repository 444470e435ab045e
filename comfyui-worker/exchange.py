"""Client of the app server's file exchange: participants' inputs in, job outputs out.

The exchange is a plain nginx on the app server's tailnet address (roles/appserver_exchange):
`GET /inputs/<user_id>/<name>` and `GET /inputs/shared/<name>` read the participants' uploads,
`PUT /outputs/<user_id>/<job_id>/<name>` writes a result (nginx writes a temporary file and
renames it, so a reader never sees half a file), and `GET /outputs/...` reads one back. Every
request carries `Authorization: Bearer <token>`; the token is read from a file at start and never
logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp

CHUNK = 4 << 20
T = TypeVar("T")


class ExchangeUnavailable(Exception):
    """The exchange could not be reached or answered with a server error: worth retrying."""


class ExchangeRefused(Exception):
    """The exchange answered, and no retry will change the answer (401, 403, 413, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InputTooLarge(Exception):
    """An input grew past the bytes the job may still fetch."""


@dataclass(frozen=True)
class Stored:
    """What the exchange holds after a PUT: its size and sha256 as read back (or as sent)."""

    size: int
    sha256: str


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _quoted(path: str) -> str:
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"refusing an exchange path with an empty, '.' or '..' segment: {path!r}")
    return "/".join(quote(part, safe="") for part in parts)


class ExchangeClient:
    """One keep-alive HTTP session to the exchange, shared by every transfer of the worker."""

    def __init__(self, base_url: str, token: str, timeout: float) -> None:
        self.base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._headers, auto_decompress=False
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, area: str, path: str) -> str:
        return f"{self.base}/{area}/{_quoted(path)}"

    @staticmethod
    def _refusal(status: int, what: str) -> Exception:
        if status >= 500 or status in (408, 429):
            return ExchangeUnavailable(f"HTTP {status} for {what}")
        reasons = {
            401: "the exchange refused the token (FILE_EXCHANGE_TOKEN_FILE)",
            403: "the exchange forbids it",
            404: "not found",
            405: "method not allowed",
            413: "larger than the exchange accepts (its request-size limit)",
        }
        return ExchangeRefused(status, f"{reasons.get(status, f'HTTP {status}')} ({what})")

    async def fetch(self, path: str, dest: str, max_bytes: int) -> int:
        """GET inputs/<path> into dest (via a temporary name); returns its size."""
        assert self._session is not None, "start() first"
        # A name no input can have (inputs never start with "."-only segments plus a uuid).
        tmp = os.path.join(os.path.dirname(dest), f".{uuid.uuid4().hex}.fetching")
        try:
            async with self._session.get(self.url("inputs", path)) as resp:
                if resp.status != 200:
                    raise self._refusal(resp.status, f"inputs/{path}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise InputTooLarge(str(resp.content_length))
                size = 0
                with open(tmp, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise InputTooLarge(str(size))
                        fh.write(chunk)
            os.replace(tmp, dest)
            return size
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ExchangeUnavailable(str(exc) or type(exc).__name__) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def put(self, path: str, source: str) -> Stored:
        """PUT source to outputs/<path>; returns the size and sha256 of what was sent."""
        assert self._session is not None, "start() first"
        size = os.path.getsize(source)
        # The file's sha256 is computed in a thread while the same bytes go out on the socket
        # (hashlib releases the GIL), so hashing costs no time on a host with a spare core.
        digest = asyncio.ensure_future(asyncio.to_thread(_file_sha256, source))

        async def body() -> AsyncIterator[bytes]:
            with open(source, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        try:
            async with self._session.put(
                self.url("outputs", path), data=body(), headers=headers
            ) as resp:
                await resp.read()
                if resp.status not in (200, 201, 204):
                    raise self._refusal(resp.status, f"outputs/{path}")
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ExchangeUnavailable(str(exc) or type(exc).__name__) from exc
        finally:
            sha256 = await digest
        return Stored(size, sha256)

    async def read_back(self, path: str, checksum: bool) -> Stored:
        """What the exchange now holds at outputs/<path>: size (HEAD) or size and sha256 (GET)."""
        assert self._session is not None, "start() first"
        url = self.url("outputs", path)
        try:
            if not checksum:
                async with self._session.head(url) as resp:
                    if resp.status != 200:
                        raise self._refusal(resp.status, f"outputs/{path}")
                    return Stored(resp.content_length or 0, "")
            digest = hashlib.sha256()
            size = 0
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise self._refusal(resp.status, f"outputs/{path}")
                async for chunk in resp.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            return Stored(size, digest.hexdigest())
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ExchangeUnavailable(str(exc) or type(exc).__name__) from exc


async def with_retries(
    call: Callable[[], Awaitable[T]],
    within: float,
    backoff_max: float,
    give_up: Callable[[], bool] = lambda: False,
) -> T:
    """Retry `call` while the exchange is unavailable, with capped backoff, for `within` s."""
    started = time.monotonic()
    delay = 0.25
    while True:
        try:
            return await call()
        except ExchangeUnavailable:
            if give_up() or time.monotonic() - started + delay > within:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max)
