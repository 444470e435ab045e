#!/usr/bin/python
# Copyright: comfyume GPU host project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module worker_image: make the worker image present, the cheapest way first.

A fleet converges several GPU hosts at once and every one of them needs the same
multi-gigabyte image. Building it on each host costs minutes and gigabytes of downloads
per host; loading a verified tarball from the shared SFS cache costs about a minute. So
the order is: the tag is already here, a verified tarball in the cache, a registry, and
only then a build, whose result goes into the cache for the others (and to the registry).
A lock in the cache makes concurrent hosts wait for the one that builds.

The decisions live in plain functions and a small class that takes a ``Docker`` object,
so the tests drive them with a fake engine and a real temporary cache directory. The
file is self-contained because Ansible ships it alone to the target (Python 3.8+).
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: worker_image
short_description: Make a worker image present from the cache, a registry or a build
description:
  - Ensures that the image O(name):O(tag) is in the host's Docker engine. The steps, in
    order, stop at the first that succeeds
  - "1. the tag is present: nothing to do."
  - "2. a tarball of the tag in O(cache_dir) (C(NAME_TAG.tar) or C(NAME_TAG.tar.zst), never
    gzip) whose sha256 matches the C(.sha256) file beside it: loaded. A tarball whose checksum
    does not match is refused, removed under the lock and replaced; it is never loaded."
  - "3. O(registry)/O(name):O(tag) pulled and tagged O(name):O(tag), when O(registry) is set."
  - "4. a build of O(context) with O(build_args), then C(docker save) into the cache under a
    temporary name, checksummed, and renamed into place; pushed when O(registry) is set."
  - Before building, a host takes the lock C(.NAME_TAG.lock) in the cache. Other hosts that
    find it wait for the tarball and load it, for at most O(lock_timeout) seconds, then fail
    with a message naming the lock and its owner. A lock that this host left behind (its
    process is gone, or the host rebooted since) is taken over.
  - Tarballs of other tags are pruned, keeping the newest O(cache_keep) besides the current one.
  - Every step is reported in RV(steps) with its duration. In check mode nothing is changed
    and RV(source) says what would be done.
options:
  name:
    description: Image name, without tag.
    type: str
    required: true
  tag:
    description: Image tag (the worker role's content hash).
    type: str
    required: true
  context:
    description: Build context directory (the host's C(comfyui-worker/)).
    type: path
    required: true
  build_args:
    description: Build arguments, each C(KEY=VALUE).
    type: list
    elements: str
    default: []
  labels:
    description: Labels put on a built image.
    type: dict
    default: {}
  cache_dir:
    description: Shared image cache (on the SFS share); empty disables the cache.
    type: str
    default: ""
  cache_format:
    description: Format of the tarballs this host writes; C(tar) is uncompressed. Both are read.
    type: str
    choices: [tar, zst]
    default: zst
  cache_keep:
    description: Tarballs of other tags kept in the cache, newest first.
    type: int
    default: 1
  lock_timeout:
    description: Seconds to wait for another host's build before failing.
    type: int
    default: 3600
  registry:
    description: Registry prefix (C(host:port/path)) to pull from and push to; empty for none.
    type: str
    default: ""
  host_id:
    description: This host's name, recorded in the lock and in the tarball's build record.
    type: str
    required: true
  record:
    description: File where the outcome is written as JSON when the image was made present.
    type: path
    default: /var/lib/comfyume/worker-image.json
author:
  - comfyume GPU host maintainers
"""

EXAMPLES = r"""
- name: Make the worker image present
  worker_image:
    name: comfyui-worker
    tag: 3f9c0a1b2c3d4e5f
    context: /home/dev/comfyume/comfyui-worker
    build_args: [BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04]
    cache_dir: /mnt/sfs/cache/images
    host_id: verda-h100-1
"""

RETURN = r"""
source:
  description: Where the image came from (or would come from in check mode).
  type: str
  returned: always
  sample: cache
steps:
  description: Each step taken, with its duration in seconds and what it found.
  type: list
  returned: always
  sample: [{"step": "verify", "seconds": 2.1, "detail": "sha256 ok"}]
tarball:
  description: The cache tarball that was loaded or written, if any.
  type: str
  returned: always
tarball_bytes:
  description: Its size in bytes (0 when there is none).
  type: int
  returned: always
refused:
  description: Cache tarballs refused because their checksum did not match.
  type: list
  returned: always
pruned:
  description: Cache tarballs removed because they are older than O(cache_keep) allows.
  type: list
  returned: always
"""

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

FORMATS = {"zst": ".tar.zst", "tar": ".tar"}
CHUNK = 4 * 1024 * 1024
POLL_SECONDS = 2.0


class ImageError(Exception):
    """A failure the admin must act on; the message names the variable involved."""


# --- the cache's file names -------------------------------------------------------------


def tarball_name(name: str, tag: str, fmt: str) -> str:
    """File name of a tag's tarball: the image name's slashes become dashes."""
    return "{}_{}{}".format(name.replace("/", "-"), tag, FORMATS[fmt])


def lock_name(name: str, tag: str) -> str:
    return ".{}_{}.lock".format(name.replace("/", "-"), tag)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksum(path: str) -> str | None:
    """The hex digest in a ``sha256sum``-style file, or None when it is missing or garbled."""
    try:
        with open(path, encoding="ascii") as handle:
            words = handle.read().split()
    except (OSError, UnicodeDecodeError):
        return None
    if not words or len(words[0]) != 64:
        return None
    try:
        int(words[0], 16)
    except ValueError:
        return None
    return words[0].lower()


def verify_tarball(path: str) -> tuple[bool, str]:
    """Whether a cached tarball matches the checksum beside it, and why not."""
    want = read_checksum(path + ".sha256")
    if want is None:
        return False, f"no readable {os.path.basename(path)}.sha256 beside it"
    got = sha256_of(path)
    if got != want:
        return False, f"sha256 {got[:16]} does not match the recorded {want[:16]}"
    return True, "sha256 ok"


def prune_candidates(files: list[tuple[str, float]], name: str, keep_tag: str, keep: int) -> list:
    """Tarballs of ``name`` to remove: all but the current tag's and the ``keep`` newest others.

    ``files`` holds (file name, mtime) pairs of the cache directory.
    """
    prefix = name.replace("/", "-") + "_"
    current = {tarball_name(name, keep_tag, fmt) for fmt in FORMATS}
    others = [
        (fname, mtime)
        for fname, mtime in files
        if fname.startswith(prefix)
        and fname.endswith(tuple(FORMATS.values()))
        and fname not in current
    ]
    others.sort(key=lambda item: item[1], reverse=True)
    return [fname for fname, _ in others[max(keep, 0) :]]


# --- the lock ---------------------------------------------------------------------------


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(lock_dir: str) -> dict:
    try:
        with open(os.path.join(lock_dir, "owner.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def lock_is_ours_and_dead(owner: dict, host_id: str) -> bool:
    """A lock this host left behind: same host, and its process or its boot is gone."""
    if not owner or owner.get("host") != host_id:
        return False
    if owner.get("boot_id") and owner.get("boot_id") != boot_id():
        return True
    pid = owner.get("pid")
    return isinstance(pid, int) and not pid_alive(pid)


def try_lock(lock_dir: str, host_id: str) -> bool:
    """Take the lock (mkdir is atomic, NFS included); False when someone holds it."""
    try:
        os.mkdir(lock_dir)
    except FileExistsError:
        return False
    owner = {"host": host_id, "pid": os.getpid(), "boot_id": boot_id(), "since": time.time()}
    with open(os.path.join(lock_dir, "owner.json"), "w", encoding="utf-8") as handle:
        json.dump(owner, handle)
    return True


def file_id(path: str) -> tuple:
    try:
        info = os.stat(path)
    except OSError:
        return (path, None, None)
    return (path, info.st_size, info.st_mtime_ns)


def remove_tarball(path: str) -> None:
    for victim in (path, path + ".sha256"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(victim)


def release_lock(lock_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(lock_dir, "owner.json"))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(lock_dir)


# --- the engine -------------------------------------------------------------------------


class Docker:
    """The few docker CLI calls the module needs. Tests substitute a fake."""

    def __init__(self, run_command):
        self._run = run_command

    def has_image(self, ref: str) -> bool:
        rc, _, _ = self._run(["docker", "image", "inspect", "--format", "{{.Id}}", ref])
        return rc == 0

    def load(self, path: str) -> tuple[int, str]:
        if path.endswith(".zst"):
            cmd = f"zstd -dc -- {shell_quote(path)} | docker load"
        else:
            cmd = f"docker load -i {shell_quote(path)}"
        rc, out, err = self._run(["/bin/bash", "-o", "pipefail", "-c", cmd])
        return rc, (out + err).strip()

    def save(self, ref: str, path: str, fmt: str) -> tuple[int, str]:
        if fmt == "zst":
            cmd = f"docker save {shell_quote(ref)} | zstd -q -T0 -3 -o {shell_quote(path)}"
        else:
            cmd = f"docker save -o {shell_quote(path)} {shell_quote(ref)}"
        rc, out, err = self._run(["/bin/bash", "-o", "pipefail", "-c", cmd])
        return rc, (out + err).strip()

    def pull(self, ref: str) -> tuple[int, str]:
        rc, out, err = self._run(["docker", "pull", "--quiet", ref])
        return rc, (out + err).strip()

    def push(self, ref: str) -> tuple[int, str]:
        rc, out, err = self._run(["docker", "push", "--quiet", ref])
        return rc, (out + err).strip()

    def tag(self, source: str, target: str) -> tuple[int, str]:
        rc, out, err = self._run(["docker", "tag", source, target])
        return rc, (out + err).strip()

    def build(self, ref: str, context: str, build_args, labels) -> tuple[int, str]:
        argv = ["docker", "build", "--tag", ref]
        for arg in build_args:
            argv += ["--build-arg", arg]
        for key, value in sorted(labels.items()):
            argv += ["--label", f"{key}={value}"]
        rc, out, err = self._run([*argv, context])
        return rc, (out + err).strip()


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- the decision -----------------------------------------------------------------------


class Acquire:
    """Makes one image present; every step it takes is appended to ``steps``."""

    def __init__(
        self,
        docker,
        params: dict,
        check_mode: bool = False,
        sleep=time.sleep,
        clock=time.monotonic,
        warn=None,
    ):
        self.docker = docker
        self.p = params
        self.check_mode = check_mode
        self.sleep = sleep
        self.clock = clock
        self.warn = warn or (lambda msg: None)
        self.ref = "{}:{}".format(params["name"], params["tag"])
        self.steps: list[dict] = []
        self.refused: list[str] = []
        self.pruned: list[str] = []
        self.tarball = ""
        self.tarball_bytes = 0
        self.cache = params.get("cache_dir") or ""
        self.holding = False
        # Tarballs already refused (path, size, mtime): waiting for them again is no progress.
        self.refused_ids: set = set()

    # Each step records its duration, whatever it returns.
    def step(self, name: str, func, *args):
        started = self.clock()
        detail = ""
        try:
            result = func(*args)
            detail = tail(result[1] if isinstance(result, tuple) else str(result), 2)
            return result
        except ImageError as exc:
            detail = f"failed: {exc}"
            raise
        finally:
            self.steps.append(
                {"step": name, "seconds": round(self.clock() - started, 3), "detail": detail}
            )

    def run(self) -> str:
        if self.step("present", self._present)[0]:
            return "present"
        if self.check_mode:
            return self._would()
        self._open_cache()
        deadline = self.clock() + self.p["lock_timeout"]
        while True:
            if self.cache and self._load_from_cache():
                return "cache"
            if self.p.get("registry") and self._pull():
                return "registry"
            if not self.cache:
                self._build_and_publish()
                return "build"
            lock = self._lock_path()
            if try_lock(lock, self.p["host_id"]):
                self.holding = True
                try:
                    # Someone may have finished while we looked elsewhere.
                    if self._load_from_cache():
                        return "cache"
                    self._build_and_publish()
                    return "build"
                finally:
                    self.holding = False
                    release_lock(lock)
            self.step("wait", self._wait_for, lock, deadline)

    def _lock_path(self) -> str:
        return os.path.join(self.cache, lock_name(self.p["name"], self.p["tag"]))

    def _present(self):
        here = self.docker.has_image(self.ref)
        return here, "{} {}".format(self.ref, "is present" if here else "is absent")

    def _would(self) -> str:
        if self.cache:
            for path in self._cached_tarballs():
                if os.path.isfile(path + ".sha256"):
                    self.tarball = path
                    return "cache"
        return "registry" if self.p.get("registry") else "build"

    def _open_cache(self) -> None:
        if not self.cache:
            return
        parent = os.path.dirname(self.cache.rstrip("/"))
        if not os.path.isdir(self.cache):
            if not os.path.isdir(parent):
                self.warn(
                    f"worker_image_cache_dir {self.cache}: its parent {parent} does not exist "
                    "(is the SFS share mounted?); making the image without the cache"
                )
                self.cache = ""
                return
            try:
                os.mkdir(self.cache, 0o775)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ImageError(
                    f"worker_image_cache_dir {self.cache} cannot be created: {exc}"
                ) from exc
        probe = os.path.join(self.cache, ".write-test.{}.{}".format(self.p["host_id"], os.getpid()))
        try:
            with open(probe, "w", encoding="ascii") as handle:
                handle.write("ok\n")
            os.unlink(probe)
        except OSError as exc:
            raise ImageError(
                "worker_image_cache_dir {} is not writable on {}: {}. Make it writable by root "
                "(on NFS: no root_squash for this share), or set worker_image_cache_dir: '' to "
                "build on every host".format(self.cache, self.p["host_id"], exc.strerror or exc)
            ) from exc

    def _cached_tarballs(self):
        for fmt in (self.p["cache_format"], *[f for f in FORMATS if f != self.p["cache_format"]]):
            path = os.path.join(self.cache, tarball_name(self.p["name"], self.p["tag"], fmt))
            if os.path.isfile(path):
                yield path

    def _load_from_cache(self) -> bool:
        for path in self._cached_tarballs():
            if file_id(path) in self.refused_ids:
                continue
            ok, why = self.step("verify", verify_tarball, path)
            if not ok:
                self._refuse(path, why)
                continue
            rc, out = self.step("load", self.docker.load, path)
            if rc != 0:
                raise ImageError(f"loading {path} failed: {tail(out)}")
            if not self.docker.has_image(self.ref):
                raise ImageError(
                    f"{path} passed its checksum but holds no image tagged {self.ref} "
                    f"({tail(out, 3)}): the cache of worker_image_cache_dir is inconsistent; "
                    "remove that tarball"
                )
            self.tarball = path
            self.tarball_bytes = os.path.getsize(path)
            return True
        return False

    def _refuse(self, path: str, why: str) -> None:
        """A corrupt tarball goes, under the lock, so a good one being renamed in stays."""
        if file_id(path) in self.refused_ids:
            return
        self.refused_ids.add(file_id(path))
        self.refused.append(f"{os.path.basename(path)}: {why}")
        lock = self._lock_path()
        if self.holding:
            remove_tarball(path)
            return
        if not try_lock(lock, self.p["host_id"]):
            return
        try:
            # Another host may have renamed a good one into place since we read it.
            if os.path.isfile(path) and not verify_tarball(path)[0]:
                remove_tarball(path)
        finally:
            release_lock(lock)

    def _pull(self) -> bool:
        remote = "{}/{}".format(self.p["registry"].rstrip("/"), self.ref)
        rc, out = self.step("pull", self.docker.pull, remote)
        if rc != 0:
            lowered = out.lower()
            if "not found" in lowered or "manifest unknown" in lowered:
                return False
            raise ImageError(
                "worker_image_registry {} refused the pull of {}: {}".format(
                    self.p["registry"], remote, tail(out, 5)
                )
            )
        rc, out = self.docker.tag(remote, self.ref)
        if rc != 0:
            raise ImageError(f"tagging {remote} as {self.ref} failed: {out}")
        return True

    def _build_and_publish(self) -> None:
        rc, out = self.step(
            "build",
            self.docker.build,
            self.ref,
            self.p["context"],
            self.p["build_args"],
            self.p["labels"],
        )
        if rc != 0:
            raise ImageError(f"building {self.ref} failed:\n{tail(out)}")
        if self.cache:
            self.step("save", self._save)
        if self.p.get("registry"):
            self.step("push", self._push)

    def _save(self):
        fmt = self.p["cache_format"]
        final = os.path.join(self.cache, tarball_name(self.p["name"], self.p["tag"], fmt))
        tmp = os.path.join(
            self.cache,
            ".{}.{}.{}.tmp".format(os.path.basename(final), self.p["host_id"], os.getpid()),
        )
        try:
            rc, out = self.docker.save(self.ref, tmp, fmt)
            if rc != 0:
                raise ImageError(
                    f"writing {tmp} into worker_image_cache_dir failed: {tail(out, 5)}"
                )
            digest = sha256_of(tmp)
            with open(tmp + ".sha256", "w", encoding="ascii") as handle:
                handle.write(f"{digest}  {os.path.basename(final)}\n")
            # The tarball first, its checksum last: a reader needs both, so it never sees
            # a tarball whose checksum belongs to another.
            os.replace(tmp, final)
            os.replace(tmp + ".sha256", final + ".sha256")
        finally:
            for leftover in (tmp, tmp + ".sha256"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        self.tarball = final
        self.tarball_bytes = os.path.getsize(final)
        return True, f"{os.path.basename(final)} ({self.tarball_bytes} bytes, {fmt})"

    def _push(self):
        remote = "{}/{}".format(self.p["registry"].rstrip("/"), self.ref)
        rc, out = self.docker.tag(self.ref, remote)
        if rc == 0:
            rc, out = self.docker.push(remote)
        if rc != 0:
            raise ImageError(
                "worker_image_registry {} refused the push of {}: {}".format(
                    self.p["registry"], remote, tail(out, 5)
                )
            )
        return True, remote

    def _wait_for(self, lock: str, deadline: float):
        """Wait while another host builds; True once its lock is gone or its tarball is there."""
        while True:
            owner = lock_owner(lock)
            if not os.path.isdir(lock):
                return True, "lock released"
            if lock_is_ours_and_dead(owner, self.p["host_id"]):
                release_lock(lock)
                return True, "took over a lock this host left behind"
            if self.clock() >= deadline:
                since = owner.get("since")
                age = f" for {time.time() - since:.0f} s" if since else ""
                raise ImageError(
                    "the image cache lock {} (held by {}{}) did not free within "
                    "worker_image_cache_lock_timeout ({} s). If no host is building {}, "
                    "remove that directory and run again".format(
                        lock,
                        owner.get("host", "an unknown host"),
                        age,
                        self.p["lock_timeout"],
                        self.ref,
                    )
                )
            if any(
                os.path.isfile(p + ".sha256") and file_id(p) not in self.refused_ids
                for p in self._cached_tarballs()
            ):
                return True, "tarball appeared"
            self.sleep(POLL_SECONDS)

    def prune(self) -> None:
        if not self.cache or not os.path.isdir(self.cache):
            return
        files = []
        for fname in os.listdir(self.cache):
            try:
                files.append((fname, os.path.getmtime(os.path.join(self.cache, fname))))
            except FileNotFoundError:
                continue
        for fname in prune_candidates(files, self.p["name"], self.p["tag"], self.p["cache_keep"]):
            base = fname
            for suffix in FORMATS.values():
                if fname.endswith(suffix):
                    base = fname[: -len(suffix)]
            tag = base.split("_", 1)[-1] if "_" in base else ""
            if tag and os.path.isdir(os.path.join(self.cache, lock_name(self.p["name"], tag))):
                continue
            remove_tarball(os.path.join(self.cache, fname))
            self.pruned.append(fname)


def summary(ref: str, source: str, steps: list) -> str:
    total = sum(s["seconds"] for s in steps)
    parts = ", ".join("{} {:.1f} s".format(s["step"], s["seconds"]) for s in steps)
    return f"{ref} from {source} in {total:.1f} s ({parts})"


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            tag=dict(type="str", required=True),
            context=dict(type="path", required=True),
            build_args=dict(type="list", elements="str", default=[]),
            labels=dict(type="dict", default={}),
            cache_dir=dict(type="str", default=""),
            cache_format=dict(type="str", choices=list(FORMATS), default="zst"),
            cache_keep=dict(type="int", default=1),
            lock_timeout=dict(type="int", default=3600),
            registry=dict(type="str", default=""),
            host_id=dict(type="str", required=True),
            record=dict(type="path", default="/var/lib/comfyume/worker-image.json"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    for name, low in (("cache_keep", 0), ("lock_timeout", 1)):
        if params[name] < low:
            module.fail_json(msg=f"{name} must be at least {low}, got {params[name]}")

    def run(argv):
        return module.run_command(argv, environ_update={"LC_ALL": "C"})

    acquire = Acquire(Docker(run), params, check_mode=module.check_mode, warn=module.warn)
    try:
        source = acquire.run()
        if not module.check_mode:
            acquire.prune()
    except ImageError as exc:
        module.fail_json(
            msg=str(exc), steps=acquire.steps, refused=acquire.refused, source="failed"
        )
    changed = source != "present" or bool(acquire.pruned)
    message = summary(acquire.ref, source, acquire.steps)
    for entry in acquire.steps:
        module.log(
            "worker_image {}: {} {:.3f} s {}".format(
                acquire.ref, entry["step"], entry["seconds"], entry["detail"]
            )
        )
    if source != "present" and not module.check_mode:
        record = {
            "image": acquire.ref,
            "source": source,
            "host": params["host_id"],
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": acquire.steps,
            "tarball": acquire.tarball,
            "tarball_bytes": acquire.tarball_bytes,
            "refused": acquire.refused,
            "hostname": socket.gethostname(),
        }
        os.makedirs(os.path.dirname(params["record"]), exist_ok=True)
        with open(params["record"], "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    module.exit_json(
        changed=changed,
        source=source,
        steps=acquire.steps,
        tarball=acquire.tarball,
        tarball_bytes=acquire.tarball_bytes,
        refused=acquire.refused,
        pruned=acquire.pruned,
        msg=message,
    )


def main():
    run_module()


if __name__ == "__main__":
    main()
