"""The worker drops root after reading its secrets and makes itself non-dumpable
(privileges.py): the decisions against a stand-in kernel, then the real calls in a child
process (as root, when the tests run as root) and worker.py's refusal to go on."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import privileges
import pytest
import worker
from privileges import PR_SET_DUMPABLE, PrivilegeError, SystemCalls
from worker_testlib import WORKER_DIR


class Account(NamedTuple):
    """What privileges.py reads of a pwd entry."""

    pw_name: str
    pw_uid: int
    pw_gid: int
    pw_dir: str


COMFY = Account("comfy", 1000, 1000, "/home/comfy")
TOOR = Account("toor", 0, 0, "/root")
ZEROGROUP = Account("staff0", 1001, 0, "/home/staff0")


class Kernel(SystemCalls):
    """Credentials as the kernel keeps them, for one process. Changing ids needs root (the
    capabilities a container grants it); a full drop loses them for good, unless `leaky`
    (a kernel, or a wrong call, that leaves the way back to root open)."""

    def __init__(
        self,
        uid: int = 0,
        gid: int = 0,
        groups: tuple[int, ...] = (0, 27),
        caps: bool = True,
        leaky: bool = False,
        half_drop: bool = False,
        prctl_works: bool | None = True,
    ) -> None:
        self.uids, self.gids, self.groups = [uid] * 3, [gid] * 3, list(groups)
        self.caps, self.leaky, self.half_drop = caps, leaky, half_drop
        self.prctl_works = prctl_works
        self.dumpable = 1
        self.calls: list[tuple] = []
        self.accounts = {a.pw_name: a for a in (COMFY, TOOR, ZEROGROUP)}

    def _privileged(self) -> None:
        if not (self.caps and self.uids[1] == 0):
            raise PermissionError(1, "Operation not permitted")

    def getresuid(self):
        return tuple(self.uids)

    def getresgid(self):
        return tuple(self.gids)

    def getgroups(self):
        return list(self.groups)

    def setgroups(self, groups):
        self.calls.append(("setgroups", list(groups)))
        self._privileged()
        self.groups = list(groups)

    def setresgid(self, r, e, s):
        self.calls.append(("setresgid", r, e, s))
        self._privileged()
        self.gids = [r, e, s]

    def setresuid(self, r, e, s):
        self.calls.append(("setresuid", r, e, s))
        self._privileged()
        self.uids = [r, e, 0 if self.half_drop else s]

    def setuid(self, uid):
        self.calls.append(("setuid", uid))
        if self.uids[1] == 0 or self.leaky or uid in self.uids:
            self.uids = [uid] * 3
            return
        raise PermissionError(1, "Operation not permitted")

    def setgid(self, gid):
        self.calls.append(("setgid", gid))
        if self.uids[1] == 0 or self.leaky or gid in self.gids:
            self.gids = [gid] * 3
            return
        raise PermissionError(1, "Operation not permitted")

    def getpwnam(self, name):
        return self.accounts[name]

    def getpwuid(self, uid):
        for account in self.accounts.values():
            if account.pw_uid == uid:
                return account
        raise KeyError(uid)

    def prctl(self, option, arg=0):
        self.calls.append(("prctl", option, arg))
        if self.prctl_works is None:
            return None
        if not self.prctl_works:
            raise OSError(22, "Invalid argument")
        if option == PR_SET_DUMPABLE:
            self.dumpable = arg
            return 0
        return self.dumpable

    def id_changes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in ("setgroups", "setresgid", "setresuid")]


def test_root_becomes_the_account_for_good_and_ends_non_dumpable() -> None:
    kernel, env = Kernel(), {"HOME": "/root"}
    identity = privileges.drop("comfy", env, kernel)
    # Groups first, then the group ids, then the user ids: each needs the root it removes.
    assert kernel.id_changes() == [
        ("setgroups", []),
        ("setresgid", 1000, 1000, 1000),
        ("setresuid", 1000, 1000, 1000),
    ]
    assert kernel.getresuid() == (1000, 1000, 1000) and kernel.getresgid() == (1000,) * 3
    assert kernel.groups == []
    # The way back was tried, and refused.
    assert ("setuid", 0) in kernel.calls and ("setgid", 0) in kernel.calls
    assert kernel.getresuid() == (1000, 1000, 1000)
    assert kernel.dumpable == 0
    assert env == {"HOME": "/home/comfy", "USER": "comfy", "LOGNAME": "comfy"}
    assert identity == privileges.Identity("comfy", 1000, 1000, dropped=True)
    assert "cannot become root again" in identity.describe()


@pytest.mark.parametrize("user", ["comfy", ""])
def test_a_process_that_is_not_root_changes_no_id_and_ends_non_dumpable(user) -> None:
    """The tests and a developer's run: nothing to drop, never dumpable all the same."""
    kernel, env = Kernel(uid=1000, gid=1000, groups=(1000,), caps=False), {}
    identity = privileges.drop(user, env, kernel)
    assert kernel.id_changes() == [] and env == {}
    assert kernel.dumpable == 0
    assert identity == privileges.Identity("comfy", 1000, 1000, dropped=False)


def test_root_without_worker_user_stays_root_and_says_so() -> None:
    """Outside the image (WORKER_USER unset), as the tests run under root in CI."""
    kernel = Kernel()
    identity = privileges.drop("", {}, kernel)
    assert kernel.id_changes() == [] and kernel.dumpable == 0
    assert identity.uid == 0 and not identity.dropped
    assert "ComfyUI runs as root too" in identity.describe()


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("nobody-here", "WORKER_USER 'nobody-here' is not an account of this image"),
        ("toor", "WORKER_USER 'toor' has uid 0 and gid 0: ComfyUI is never run as root"),
        ("staff0", "WORKER_USER 'staff0' has uid 1001 and gid 0"),
        ("no spaces", "WORKER_USER 'no spaces' is not an account name"),
    ],
)
def test_an_account_that_is_missing_or_root_is_refused_before_any_change(user, message) -> None:
    kernel = Kernel()
    with pytest.raises(PrivilegeError, match=message):
        privileges.drop(user, {}, kernel)
    assert kernel.id_changes() == []


def test_without_the_setuid_and_setgid_capabilities_the_drop_is_refused() -> None:
    kernel = Kernel(caps=False)
    with pytest.raises(PrivilegeError) as info:
        privileges.drop("comfy", {}, kernel)
    assert "cannot become comfy (uid 1000, gid 1000): Operation not permitted" in str(info.value)
    assert "SETUID and SETGID capabilities" in str(info.value)


def test_a_saved_root_uid_is_caught() -> None:
    kernel = Kernel(half_drop=True)
    with pytest.raises(PrivilegeError, match=r"still uids \(1000, 1000, 0\)"):
        privileges.drop("comfy", {}, kernel)


def test_a_way_back_to_root_is_caught() -> None:
    kernel = Kernel(leaky=True)
    with pytest.raises(PrivilegeError, match="uid 0 could be set again after becoming comfy"):
        privileges.drop("comfy", {}, kernel)


def test_supplementary_groups_that_stay_are_caught() -> None:
    class KeepsGroups(Kernel):
        def setgroups(self, groups):
            self.calls.append(("setgroups", list(groups)))

    with pytest.raises(PrivilegeError, match=r"still in the groups \[0, 27\]"):
        privileges.drop("comfy", {}, KeepsGroups())


def test_a_process_that_cannot_be_made_non_dumpable_stops() -> None:
    with pytest.raises(PrivilegeError, match="cannot make the worker non-dumpable"):
        privileges.drop("", {}, Kernel(uid=1000, gid=1000, caps=False, prctl_works=False))


def test_without_prctl_nothing_is_made_non_dumpable() -> None:
    """Not Linux: a developer's machine."""
    kernel = Kernel(uid=1000, gid=1000, caps=False, prctl_works=None)
    assert privileges.drop("", {}, kernel).uid == 1000


# ---- the real system calls ------------------------------------------------------------------

# In a child process of its own: it cannot return to root afterwards, whatever the test does.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import privileges
    env = {}
    identity = privileges.drop(sys.argv[2], env)
    calls = privileges.SystemCalls()
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    print(json.dumps({
        "uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups(),
        "dumpable": calls.prctl(privileges.PR_GET_DUMPABLE), "regained": regained,
        "home": env.get("HOME"), "dropped": identity.dropped,
    }), flush=True)
    sys.stdin.read()  # stay alive while the test looks at this process
    """
)


def run_child(user: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(WORKER_DIR), user],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_process_is_non_dumpable_after_drop_whoever_runs_it() -> None:
    child = run_child("")
    try:
        state = json.loads(child.stdout.readline())
        assert state["dumpable"] == 0
        assert state["dropped"] is False
        assert tuple(state["uids"]) == os.getresuid()
    finally:
        child.communicate("", timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_root_really_drops_to_the_account_and_hides_from_its_siblings() -> None:
    """The real calls, as the container makes them, to Debian's `nobody`; then a process of
    that same user (ComfyUI's position) is refused the dropped process's environment."""
    nobody = pwd.getpwnam("nobody")
    child = run_child("nobody")
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        state = json.loads(line)
        assert tuple(state["uids"]) == (nobody.pw_uid,) * 3
        assert tuple(state["gids"]) == (nobody.pw_gid,) * 3
        assert set(state["groups"]) <= {nobody.pw_gid}
        assert state["regained"] is False and state["dumpable"] == 0 and state["dropped"]
        assert state["home"] == nobody.pw_dir
        sibling = subprocess.run(
            ["cat", f"/proc/{child.pid}/environ"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sibling.returncode != 0
        assert "Permission denied" in sibling.stderr, sibling.stderr
    finally:
        child.communicate("", timeout=10)


# ---- worker.py ------------------------------------------------------------------------------


def test_the_worker_stops_with_exit_2_when_the_drop_fails(monkeypatch, capsys) -> None:
    """Before any log line, thread or ComfyUI: nothing has started when it refuses."""

    def refuse(user, env, calls=None):
        raise PrivilegeError("cannot become comfy (uid 1000, gid 1000): Operation not permitted")

    started = []
    monkeypatch.setattr(privileges, "drop", refuse)
    monkeypatch.setattr(worker.logs, "setup", lambda *a: started.append("logs"))
    monkeypatch.setattr(worker.asyncio, "run", lambda *a: started.append("loop"))
    for name in list(os.environ):
        if name.startswith(("REDIS_", "COMFYUI_", "WORKER_", "QUEUE_", "OUTPUT_", "FILE_")):
            monkeypatch.delenv(name)
    assert worker.main([]) == 2
    err = capsys.readouterr().err
    assert "cannot become comfy" in err and "stopping instead of running ComfyUI" in err
    assert started == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal applies to a worker started as root")
def test_a_worker_started_as_root_with_an_unknown_account_exits_2() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "worker.py"],
        cwd=WORKER_DIR,
        env={"PATH": "/usr/bin:/bin", "WORKER_USER": "no-such-account"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "WORKER_USER 'no-such-account' is not an account of this image" in done.stderr
    assert time.monotonic() - started < 30
