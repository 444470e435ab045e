"""Delivering a job's outputs to where participants see them, before the job is "completed".

With OUTPUT_DELIVERY=exchange each file goes to the app server's exchange under
`<user_id>/<job_id>/<name>` and is read back to check its size and sha256; transfers that fail
are retried with capped backoff for up to OUTPUT_DELIVERY_TIMEOUT. Delivered files are removed
from this host (unless OUTPUT_RETAIN). When delivery still fails, the files move to
`<staging>/undelivered/<user_id>/<job_id>/` and the job fails with a message that says where they
are: they are never lost and the job is never silently "completed". With OUTPUT_DELIVERY=local
the outputs are already in the shared outputs folder and nothing moves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from exchange import ExchangeClient, ExchangeRefused, ExchangeUnavailable, with_retries
from jobs import JobFailure
from outputs import remove_tree

log = logging.getLogger("comfyui_worker.delivery")


class Delivery(Protocol):
    async def deliver(self, user_id: str, job_id: str, folder: str, files: list[dict[str, Any]]):
        """Make the files visible to the participant; adds `sha256` to each entry."""

    def keep_orphans(self) -> list[str]:
        """At start: keep outputs a killed run left in transit; returns where they went."""


class LocalDelivery:
    """The outputs folder is the app server's (a single host): the files are already there."""

    async def deliver(self, user_id: str, job_id: str, folder: str, files: list[dict[str, Any]]):
        return None

    def keep_orphans(self) -> list[str]:
        return []  # nothing is in transit: the files are written where they stay


class ExchangeDelivery:
    """PUT to the app server's exchange, verified, retried, and kept on failure."""

    def __init__(
        self,
        client: ExchangeClient,
        staging_dir: str,
        timeout: float,
        backoff_max: float,
        retain: bool,
        verify_checksum: bool = True,
        host_path: Callable[[str], str] = lambda p: p,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.staging_dir = staging_dir
        self.timeout = timeout
        self.backoff_max = backoff_max
        self.retain = retain
        self.verify_checksum = verify_checksum
        self.host_path = host_path
        self.give_up = give_up

    async def _send(self, remote: str, local: str) -> str:
        sent = await self.client.put(remote, local)
        stored = await self.client.read_back(remote, self.verify_checksum)
        if stored.size != sent.size or (self.verify_checksum and stored.sha256 != sent.sha256):
            raise ExchangeUnavailable(
                f"outputs/{remote} reads back as {stored.size} bytes "
                f"(sha256 {stored.sha256[:12] or '-'}), sent {sent.size} "
                f"(sha256 {sent.sha256[:12]})"
            )
        return sent.sha256

    async def deliver(self, user_id: str, job_id: str, folder: str, files: list[dict[str, Any]]):
        outputs_root = os.path.dirname(os.path.dirname(folder))
        deadline = time.monotonic() + self.timeout  # one deadline for the whole job
        try:
            for item in files:
                remote = os.path.relpath(item["path"], outputs_root).replace(os.sep, "/")
                left = max(0.0, deadline - time.monotonic())
                item["sha256"] = await asyncio.wait_for(
                    with_retries(
                        lambda remote=remote, local=item["path"]: self._send(remote, local),
                        left,
                        self.backoff_max,
                        self.give_up,
                    ),
                    left + 1,
                )
        except (ExchangeUnavailable, ExchangeRefused, asyncio.TimeoutError, OSError) as exc:
            kept = self._keep(user_id, job_id, folder)
            reason: str = str(exc)
            if isinstance(exc, ExchangeRefused):
                how = "(not retried: the answer would not change)"
            elif isinstance(exc, (ExchangeUnavailable, asyncio.TimeoutError)):
                how = (
                    "before the worker stopped"
                    if self.give_up()
                    else f"within {self.timeout:g} s (OUTPUT_DELIVERY_TIMEOUT)"
                )
                if isinstance(exc, asyncio.TimeoutError):
                    reason = "a transfer did not finish in time"
            else:
                how = "(a local error)"
                reason = exc.strerror or type(exc).__name__
            raise JobFailure(
                "delivery",
                f"could not deliver the outputs to the app server's file exchange {how}: "
                f"{reason}. Nothing is lost: the {len(files)} file(s) are kept on "
                f"{socket.gethostname()} in {self.host_path(kept)}",
                {"kept_on": socket.gethostname(), "kept_in": self.host_path(kept)},
            ) from exc
        if not self.retain:
            remove_tree(folder, outputs_root)

    def keep_orphans(self) -> list[str]:
        """At start: outputs a killed run left in transit go where the admin looks for them."""
        outputs = os.path.join(self.staging_dir, "outputs")
        kept = []
        if self.retain or not os.path.isdir(outputs):
            return kept
        for user_id in sorted(os.listdir(outputs)):
            user_dir = os.path.join(outputs, user_id)
            if not os.path.isdir(user_dir) or os.path.islink(user_dir):
                continue
            for job_id in sorted(os.listdir(user_dir)):
                kept.append(self._keep(user_id, job_id, os.path.join(user_dir, job_id)))
            remove_tree(user_dir, outputs)
        return kept

    def _keep(self, user_id: str, job_id: str, folder: str) -> str:
        target = os.path.join(self.staging_dir, "undelivered", user_id, job_id)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(folder):
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
        log.error("outputs kept in %s for the admin to deliver", self.host_path(target))
        return target
