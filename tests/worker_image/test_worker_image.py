"""The worker_image module's decisions, driven with a fake engine and a real cache folder.

The fake engine keeps its images in a set and writes "tarballs" that name the image they
hold, so a test can tell a load from a build and count both. The real engine path runs
in the molecule scenarios (default and fleet).
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "roles" / "worker" / "library" / "worker_image.py"
spec = importlib.util.spec_from_file_location("worker_image", MODULE)
wi = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wi)

NAME, TAG = "comfyui-worker", "0123456789abcdef"
REF = f"{NAME}:{TAG}"


class FakeDocker:
    def __init__(self, images=(), registry=None, build_seconds=0.0, pull_error=""):
        self.images = set(images)
        self.registry = dict(registry or {})
        self.builds = 0
        self.loads = []
        self.pushed = []
        self.build_seconds = build_seconds
        self.pull_error = pull_error
        self.lock = threading.Lock()

    def has_image(self, ref):
        return ref in self.images

    def load(self, path):
        self.loads.append(path)
        ref = Path(path).read_bytes().split(b"\n", 1)[0].decode()
        self.images.add(ref)
        return 0, f"Loaded image: {ref}"

    def save(self, ref, path, fmt):
        Path(path).write_bytes(ref.encode() + b"\n" + b"x" * 4096)
        return 0, ""

    def build(self, ref, context, build_args, labels):
        time.sleep(self.build_seconds)
        with self.lock:
            self.builds += 1
        self.images.add(ref)
        return 0, "built"

    def pull(self, ref):
        if self.pull_error:
            return 1, self.pull_error
        if ref in self.registry:
            self.images.add(ref)
            return 0, ref
        return 1, f"Error response from daemon: manifest for {ref} not found: manifest unknown"

    def push(self, ref):
        self.pushed.append(ref)
        return 0, ""

    def tag(self, source, target):
        self.images.add(target)
        return 0, ""


def params(cache: Path | str, **over):
    base = dict(
        name=NAME,
        tag=TAG,
        context="/nonexistent/context",
        build_args=["BASE_IMAGE=x"],
        labels={},
        cache_dir=str(cache),
        cache_format="zst",
        cache_keep=1,
        lock_timeout=30,
        registry="",
        host_id="gpu-1",
    )
    base.update(over)
    return base


def write_tarball(cache: Path, ref=REF, tag=TAG, fmt="zst", good=True) -> Path:
    path = cache / wi.tarball_name(NAME, tag, fmt)
    path.write_bytes(ref.encode() + b"\n" + b"y" * 8192)
    digest = wi.sha256_of(str(path))
    (cache / (path.name + ".sha256")).write_text(f"{digest}  {path.name}\n")
    if not good:
        with open(path, "r+b") as handle:
            handle.truncate(100)
    return path


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "sfs" / "cache" / "images"
    path.mkdir(parents=True)
    return path


def test_a_present_tag_needs_nothing(cache):
    docker = FakeDocker(images=[REF])
    acquire = wi.Acquire(docker, params(cache))
    assert acquire.run() == "present"
    assert docker.builds == 0 and docker.loads == []
    assert [s["step"] for s in acquire.steps] == ["present"]


def test_a_verified_tarball_is_loaded_instead_of_building(cache):
    write_tarball(cache)
    docker = FakeDocker()
    acquire = wi.Acquire(docker, params(cache))
    assert acquire.run() == "cache"
    assert docker.builds == 0
    assert len(docker.loads) == 1
    assert [s["step"] for s in acquire.steps] == ["present", "verify", "load"]
    assert all(s["seconds"] >= 0 for s in acquire.steps)


def test_an_uncompressed_tarball_is_read_too(cache):
    write_tarball(cache, fmt="tar")
    docker = FakeDocker()
    assert wi.Acquire(docker, params(cache)).run() == "cache"
    assert docker.loads[0].endswith(".tar")


def test_a_truncated_tarball_is_refused_never_loaded_and_replaced(cache):
    bad = write_tarball(cache, good=False)
    docker = FakeDocker()
    acquire = wi.Acquire(docker, params(cache))
    assert acquire.run() == "build"
    assert docker.loads == [], "a tarball that fails its checksum must never be loaded"
    assert docker.builds == 1
    assert acquire.refused and "does not match" in acquire.refused[0]
    ok, why = wi.verify_tarball(str(bad))
    assert ok, why
    assert bad.read_bytes().startswith(REF.encode())


def test_a_tarball_without_its_checksum_is_not_trusted(cache):
    path = write_tarball(cache)
    (cache / (path.name + ".sha256")).unlink()
    docker = FakeDocker()
    acquire = wi.Acquire(docker, params(cache))
    assert acquire.run() == "build"
    assert docker.loads == []
    assert "no readable" in acquire.refused[0]


def test_a_build_is_written_to_the_cache_under_a_temporary_name_then_renamed(cache):
    docker = FakeDocker()
    seen = []
    real_save = docker.save

    def save(ref, path, fmt):
        seen.append(path)
        return real_save(ref, path, fmt)

    docker.save = save
    acquire = wi.Acquire(docker, params(cache))
    assert acquire.run() == "build"
    final = cache / wi.tarball_name(NAME, TAG, "zst")
    assert Path(seen[0]).name.startswith(".") and seen[0].endswith(".tmp")
    assert final.is_file()
    line = (cache / (final.name + ".sha256")).read_text()
    assert line == f"{wi.sha256_of(str(final))}  {final.name}\n", "sha256sum -c format"
    assert sorted(p.name for p in cache.iterdir()) == [final.name, final.name + ".sha256"]
    assert acquire.tarball_bytes == final.stat().st_size


def test_a_tag_mismatch_after_load_names_the_tarball(cache):
    write_tarball(cache, ref="comfyui-worker:someothertag")
    acquire = wi.Acquire(FakeDocker(), params(cache))
    with pytest.raises(wi.ImageError, match="holds no image tagged comfyui-worker:0123"):
        acquire.run()


def test_concurrent_hosts_build_once_and_the_others_load(cache):
    docker = FakeDocker(build_seconds=0.5)
    results = {}

    def converge(host):
        # Each host has its own engine image set, one shared build counter.
        mine = FakeDocker()
        mine.build = docker.build
        mine_has = mine.has_image

        def has_image(ref):
            return mine_has(ref) or (ref in docker.images and host in built_by)

        mine.has_image = has_image
        acquire = wi.Acquire(mine, params(cache, host_id=host), sleep=lambda s: time.sleep(0.05))
        source = acquire.run()
        if source == "build":
            built_by.add(host)
        results[host] = source

    built_by: set[str] = set()
    threads = [threading.Thread(target=converge, args=(f"gpu-{n}",)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert docker.builds == 1
    assert sorted(results.values()) == ["build", "cache", "cache", "cache"]
    assert not list(cache.glob(".*.lock"))


def test_a_lock_that_never_frees_fails_naming_the_variable_and_the_owner(cache):
    lock = cache / wi.lock_name(NAME, TAG)
    lock.mkdir()
    (lock / "owner.json").write_text(json.dumps({"host": "gpu-7", "pid": 1, "since": time.time()}))
    now = [0.0]

    def clock():
        return now[0]

    def sleep(seconds):
        now[0] += seconds

    acquire = wi.Acquire(FakeDocker(), params(cache, lock_timeout=10), sleep=sleep, clock=clock)
    with pytest.raises(wi.ImageError) as failure:
        acquire.run()
    message = str(failure.value)
    assert "worker_image_cache_lock_timeout (10 s)" in message
    assert "gpu-7" in message and str(lock) in message
    assert now[0] >= 10


def test_a_lock_this_host_left_behind_is_taken_over(cache):
    lock = cache / wi.lock_name(NAME, TAG)
    lock.mkdir()
    dead_pid = 2**22 + 12345
    owner = {"host": "gpu-1", "pid": dead_pid, "boot_id": wi.boot_id(), "since": 0}
    (lock / "owner.json").write_text(json.dumps(owner))
    docker = FakeDocker()
    acquire = wi.Acquire(docker, params(cache), sleep=lambda s: None)
    assert acquire.run() == "build"
    assert docker.builds == 1
    assert not lock.exists()


def test_another_hosts_lock_is_not_taken_over_even_with_a_dead_pid(cache):
    owner = {"host": "gpu-2", "pid": 2**22 + 12345, "boot_id": "other"}
    assert not wi.lock_is_ours_and_dead(owner, "gpu-1")
    assert wi.lock_is_ours_and_dead(dict(owner, host="gpu-1"), "gpu-1")


def test_an_unwritable_cache_fails_naming_the_variable(cache, monkeypatch):
    real_open = open

    def deny(path, *args, **kwargs):
        if ".write-test." in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(wi, "open", deny, raising=False)
    acquire = wi.Acquire(FakeDocker(), params(cache))
    with pytest.raises(wi.ImageError, match=r"worker_image_cache_dir .* is not writable on gpu-1"):
        acquire.run()


def test_a_cache_whose_parent_is_missing_is_skipped_with_a_warning(tmp_path):
    warnings = []
    docker = FakeDocker()
    missing = tmp_path / "mnt" / "sfs" / "cache" / "images"
    acquire = wi.Acquire(docker, params(missing), warn=warnings.append)
    assert acquire.run() == "build"
    assert "SFS share mounted" in warnings[0]
    assert not missing.exists()


def test_a_missing_cache_folder_is_created_when_its_parent_exists(cache):
    target = cache / "new"
    assert wi.Acquire(FakeDocker(), params(target)).run() == "build"
    assert (target / wi.tarball_name(NAME, TAG, "zst")).is_file()


def test_a_registry_is_pulled_before_building(cache):
    remote = f"registry.example:5000/comfyume/{REF}"
    docker = FakeDocker(registry={remote: True})
    acquire = wi.Acquire(docker, params(cache, registry="registry.example:5000/comfyume"))
    assert acquire.run() == "registry"
    assert docker.builds == 0 and REF in docker.images


def test_a_build_is_pushed_when_the_registry_lacks_the_tag(cache):
    docker = FakeDocker()
    acquire = wi.Acquire(docker, params(cache, registry="registry.example:5000/comfyume"))
    assert acquire.run() == "build"
    assert docker.pushed == [f"registry.example:5000/comfyume/{REF}"]


def test_a_registry_that_refuses_fails_naming_the_variable(cache):
    docker = FakeDocker(
        pull_error="Error response from daemon: Get https://r/v2/: connection refused"
    )
    acquire = wi.Acquire(docker, params(cache, registry="r:5000"))
    with pytest.raises(wi.ImageError, match="worker_image_registry r:5000 refused the pull"):
        acquire.run()
    assert docker.builds == 0


def test_check_mode_reports_what_it_would_do_and_changes_nothing(cache):
    write_tarball(cache)
    docker = FakeDocker()
    assert wi.Acquire(docker, params(cache), check_mode=True).run() == "cache"
    assert docker.loads == []
    empty = cache / "other"
    assert wi.Acquire(docker, params(empty), check_mode=True).run() == "build"
    assert not empty.exists() and docker.builds == 0


def test_prune_keeps_the_current_tag_and_the_newest_others():
    files = [
        (wi.tarball_name(NAME, TAG, "zst"), 1.0),
        (wi.tarball_name(NAME, TAG, "zst") + ".sha256", 1.0),
        (wi.tarball_name(NAME, "old1", "zst"), 50.0),
        (wi.tarball_name(NAME, "old2", "tar"), 40.0),
        (wi.tarball_name(NAME, "old3", "zst"), 30.0),
        ("other-image_abc.tar.zst", 1.0),
        (".comfyui-worker_x.tar.zst.gpu-1.9.tmp", 1.0),
    ]
    assert wi.prune_candidates(files, NAME, TAG, 1) == [
        wi.tarball_name(NAME, "old2", "tar"),
        wi.tarball_name(NAME, "old3", "zst"),
    ]
    assert wi.prune_candidates(files, NAME, TAG, 0)[0] == wi.tarball_name(NAME, "old1", "zst")
    assert wi.prune_candidates(files, NAME, TAG, 5) == []


def test_prune_removes_old_tarballs_with_their_checksums(cache):
    for n, tag in enumerate(["aaaa", "bbbb", "cccc"]):
        path = write_tarball(cache, ref=f"{NAME}:{tag}", tag=tag)
        os.utime(path, (n, n))
    acquire = wi.Acquire(FakeDocker(), params(cache, cache_keep=1))
    assert acquire.run() == "build"
    acquire.prune()
    left = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".sha256"))
    assert left == sorted([wi.tarball_name(NAME, TAG, "zst"), wi.tarball_name(NAME, "cccc", "zst")])
    assert not (cache / (wi.tarball_name(NAME, "aaaa", "zst") + ".sha256")).exists()


def test_checksum_files_that_are_garbled_read_as_missing(tmp_path):
    bad = tmp_path / "x.sha256"
    for text in ("", "nothex" * 11, "abc  file\n"):
        bad.write_text(text)
        assert wi.read_checksum(str(bad)) is None
    bad.write_text("A" * 64 + "  file\n")
    assert wi.read_checksum(str(bad)) == "a" * 64


def test_a_corrupt_tarball_behind_another_hosts_lock_still_times_out(cache):
    """The corrupt tarball cannot be removed (the lock is held), so it must not count as
    progress: the wait ends at the timeout, verifying the tarball once, not in a loop."""
    write_tarball(cache, good=False)
    lock = cache / wi.lock_name(NAME, TAG)
    lock.mkdir()
    (lock / "owner.json").write_text(json.dumps({"host": "gpu-9", "pid": 1, "since": 0}))
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    acquire = wi.Acquire(
        FakeDocker(), params(cache, lock_timeout=10), sleep=sleep, clock=lambda: now[0]
    )
    with pytest.raises(wi.ImageError, match="worker_image_cache_lock_timeout"):
        acquire.run()
    assert len(acquire.refused) == 1
    assert [s["step"] for s in acquire.steps].count("verify") == 1
