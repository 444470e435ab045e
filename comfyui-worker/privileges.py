"""Who the worker runs as: root only long enough to read its secrets, then the image's user.

The Redis password and the file exchange's token reach the container as files only root can
read (root:root 0400, mounted read-only at /run/secrets/...), never as environment variables,
which `docker inspect` and /proc/<pid>/environ show. So the container starts as root; the
worker reads its configuration and secrets (config.Config.from_env), then becomes WORKER_USER
(the image's `comfy`) for good, before it sets up logging, starts a thread or task, or starts
ComfyUI. ComfyUI is the worker's child and runs as the same user, so the worker also makes
itself non-dumpable: another process of that user can then neither ptrace it nor read its
/proc/<pid>/environ, mem or fd, where the secrets it holds in memory could be found.

Started by anyone else (the tests, a developer's shell), nothing is dropped, and the process
is made non-dumpable all the same. Every system call goes through one `SystemCalls` object,
so the decisions can be tested without root.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from config import ACCOUNT_RE

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


class PrivilegeError(RuntimeError):
    """The worker cannot make itself safe to run ComfyUI; it must not go on."""


@dataclass(frozen=True)
class Identity:
    """Who the process is after `drop`, for the start-up log line."""

    user: str
    uid: int
    gid: int
    dropped: bool

    def describe(self) -> str:
        if self.dropped:
            return (
                f"running as {self.user} (uid {self.uid}, gid {self.gid}), non-dumpable: started "
                "as root to read the secrets, it cannot become root again"
            )
        if self.uid == 0:
            return (
                "running as root: WORKER_USER is not set, so ComfyUI runs as root too "
                "(the image sets WORKER_USER=comfy)"
            )
        return f"running as {self.user} (uid {self.uid}, gid {self.gid}); nothing to drop"


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# libc's prctl(2), resolved once at import (None where there is none): supervisor.py calls it
# in the child between fork and exec, where nothing may be dlopened.
LIBC_PRCTL = _libc_prctl()


class SystemCalls:
    """The calls `drop` makes; tests substitute an object with the same methods."""

    getresuid = staticmethod(os.getresuid)
    getresgid = staticmethod(os.getresgid)
    getgroups = staticmethod(os.getgroups)
    setgroups = staticmethod(os.setgroups)
    setresgid = staticmethod(os.setresgid)
    setresuid = staticmethod(os.setresuid)
    setuid = staticmethod(os.setuid)
    setgid = staticmethod(os.setgid)
    getpwnam = staticmethod(pwd.getpwnam)
    getpwuid = staticmethod(pwd.getpwuid)

    def __init__(self) -> None:
        self._prctl = LIBC_PRCTL

    def prctl(self, option: int, arg: int = 0) -> int | None:
        """prctl(2); None where there is none (not Linux). Raises OSError on failure."""
        if self._prctl is None:
            return None
        result = self._prctl(option, arg, 0, 0, 0)
        if result == -1:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return result


def target_account(user: str, calls: SystemCalls) -> pwd.struct_passwd:
    """The account to become; never one with uid or gid 0."""
    if not ACCOUNT_RE.match(user):
        raise PrivilegeError(f"WORKER_USER {user!r} is not an account name")
    try:
        account = calls.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"WORKER_USER {user!r} is not an account of this image (the image's is comfy)"
        ) from None
    if account.pw_uid == 0 or account.pw_gid == 0:
        raise PrivilegeError(
            f"WORKER_USER {user!r} has uid {account.pw_uid} and gid {account.pw_gid}: "
            "ComfyUI is never run as root"
        )
    return account


def _become(account: pwd.struct_passwd, calls: SystemCalls) -> None:
    """Set every user and group id to the account's, drop supplementary groups, and prove
    that root cannot be had back."""
    uid, gid = account.pw_uid, account.pw_gid
    try:
        calls.setgroups([])
        calls.setresgid(gid, gid, gid)
        calls.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot become {account.pw_name} (uid {uid}, gid {gid}): {exc.strerror or exc}; "
            "the container needs the SETUID and SETGID capabilities (cap_add in "
            "docker-compose.yml)"
        ) from exc
    if calls.getresuid() != (uid, uid, uid) or calls.getresgid() != (gid, gid, gid):
        raise PrivilegeError(
            f"still uids {calls.getresuid()} gids {calls.getresgid()} after becoming "
            f"{account.pw_name} (uid {uid}, gid {gid})"
        )
    if set(calls.getgroups()) - {gid}:
        raise PrivilegeError(f"still in the groups {calls.getgroups()} after dropping them")
    for name, regain in (("uid", calls.setuid), ("gid", calls.setgid)):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError(f"{name} 0 could be set again after becoming {account.pw_name}")


def _not_dumpable(calls: SystemCalls) -> None:
    """No process of the same user may ptrace this one or read its /proc files."""
    try:
        if calls.prctl(PR_SET_DUMPABLE, 0) is None:
            return
        dumpable = calls.prctl(PR_GET_DUMPABLE)
    except OSError as exc:
        raise PrivilegeError(f"cannot make the worker non-dumpable: {exc.strerror or exc}") from exc
    if dumpable != 0:
        raise PrivilegeError(f"the worker is still dumpable ({dumpable}) after PR_SET_DUMPABLE 0")


def drop(user: str, env: MutableMapping[str, str], calls: SystemCalls | None = None) -> Identity:
    """Started as root with WORKER_USER set (the image): become that account for good, with its
    HOME. Otherwise stay who we are. Either way, end non-dumpable. Raises PrivilegeError when
    any of that fails: the caller exits rather than run ComfyUI as root."""
    calls = calls or SystemCalls()
    root = 0 in calls.getresuid()
    dropped = False
    if root and user:
        account = target_account(user, calls)
        _become(account, calls)
        env["HOME"] = account.pw_dir
        env["USER"] = env["LOGNAME"] = account.pw_name
        dropped = True
    _not_dumpable(calls)
    uid, gid = calls.getresuid()[1], calls.getresgid()[1]
    try:
        name = calls.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Identity(name, uid, gid, dropped)
