"""The production image path: ComfyUI over git, the synced build context, the pinned build,
and the shared image cache, on the converged simulated host.

The host converged with the production default (worker_comfyui_local_source: ""), cloning
the stand-in repository that the simulated app server serves as ComfyUI v0.11.0. Each test
leaves the host as converged.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, inspect, run_playbook

WORKER_DIR = "/home/dev/comfyume/comfyui-worker"
CACHE = "/mnt/sfs/cache/images"
WORKER_PLAYBOOK = REPO / "playbooks" / "worker.yml"


def converge_worker(**variables: object):
    """playbooks/worker.yml on the simulated host; results as JSON, so no message is folded."""
    extra = ["-e", json.dumps(variables)] if variables else []
    return run_playbook(WORKER_PLAYBOOK, *extra, env={"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})


def running_tag(gpu_host) -> str:
    return inspect(gpu_host, "worker-1")["Config"]["Image"].split(":", 1)[1]


@pytest.fixture(scope="module")
def app_host_tag_commit(app_host) -> str:
    return app_host.check_output("git -C /srv/git/ComfyUI.git rev-parse 'v0.11.0^{commit}'").strip()


def test_comfyui_is_a_shallow_checkout_of_the_release_tag(gpu_host, app_host_tag_commit):
    git = f"sudo -u dev git -C {WORKER_DIR}/ComfyUI"
    assert gpu_host.check_output(f"{git} rev-parse HEAD") == app_host_tag_commit
    assert gpu_host.check_output(f"{git} rev-parse --is-shallow-repository") == "true"
    assert gpu_host.check_output(f"{git} status --porcelain") == ""
    remote = gpu_host.check_output(f"{git} remote get-url origin")
    assert remote.startswith("git://") and remote.endswith("/ComfyUI.git")


def test_the_image_records_the_commit_and_contains_the_whole_tree(gpu_host, app_host_tag_commit):
    image = inspect(gpu_host, "worker-1")["Config"]["Image"]
    labels = json.loads(gpu_host.check_output(f"docker image inspect {image}"))[0]["Config"][
        "Labels"
    ]
    assert labels["comfyume.comfyui.commit"] == app_host_tag_commit
    assert labels["comfyume.comfyui.version"] == "v0.11.0"
    listing = gpu_host.check_output("docker exec worker-1 ls -A /opt/ComfyUI").split()
    assert "main.py" in listing and ".git" not in listing


def test_the_built_image_is_in_the_cache_with_a_valid_checksum(gpu_host):
    tag = running_tag(gpu_host)
    tarball = f"{CACHE}/comfyui-worker_{tag}.tar.zst"
    check = gpu_host.run(f"cd {CACHE} && sha256sum -c comfyui-worker_{tag}.tar.zst.sha256")
    assert check.rc == 0, check.stdout + check.stderr
    assert gpu_host.file(tarball).size > 1_000_000
    # zstd's magic number, not gzip's.
    magic = gpu_host.check_output(f"head -c4 {tarball} | od -An -tx1").split()
    assert magic == ["28", "b5", "2f", "fd"], magic
    record = json.loads(gpu_host.file("/var/lib/comfyume/worker-image.json").content_string)
    assert record["image"] == f"comfyui-worker:{tag}"
    assert record["source"] == "build"
    assert [s["step"] for s in record["steps"]] == ["present", "build", "save"]
    assert not gpu_host.run(f"ls -A {CACHE} | grep -E '\\.(lock|tmp)$'").stdout


def test_a_file_removed_from_the_repository_disappears_from_the_host(gpu_host):
    before = running_tag(gpu_host)
    gpu_host.check_output(f"sudo -u dev touch {WORKER_DIR}/removed_module.py")
    run = converge_worker()
    assert run.rc == 0, run.output[-3000:]
    assert "removed_module.py" in run.output
    assert not gpu_host.file(f"{WORKER_DIR}/removed_module.py").exists
    assert running_tag(gpu_host) == before


def test_a_local_source_folder_is_copied_whole_and_an_unpinned_package_is_refused(
    gpu_host, tmp_path
):
    """The other way in: a controller folder, subfolders included. Its requirements must be
    pinned by the lock, and a failed build leaves the running workers as they were."""
    source = tmp_path / "ComfyUI"
    shutil.copytree(
        REPO / "comfyui-worker" / "tests" / "comfyui_standin",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "temp"),
    )
    (source / "comfy_extras").mkdir()
    (source / "comfy_extras" / "nodes_extra.py").write_text("# a subfolder's module\n")
    before = inspect(gpu_host, "worker-1")["Id"]

    # redis's wheel is in the offline wheels (the worker needs it), but the lock does not
    # pin it for ComfyUI: the build must stop, naming it.
    with (source / "requirements.txt").open("a") as handle:
        handle.write("redis==8.1.0\n")
    run = converge_worker(worker_comfyui_local_source=str(source))
    assert run.rc != 0
    assert "installed but not pinned by comfyui-requirements.lock: redis==8.1.0" in run.output
    assert inspect(gpu_host, "worker-1")["Id"] == before
    assert inspect(gpu_host, "worker-1")["State"]["Health"]["Status"] == "healthy"

    lines = (source / "requirements.txt").read_text().splitlines()
    (source / "requirements.txt").write_text("\n".join(lines[:-1]) + "\n")
    run = converge_worker(worker_comfyui_local_source=str(source))
    assert run.rc == 0, run.output[-3000:]
    assert gpu_host.file(f"{WORKER_DIR}/ComfyUI/comfy_extras/nodes_extra.py").exists
    assert not gpu_host.file(f"{WORKER_DIR}/ComfyUI/.git").exists
    assert (
        gpu_host.check_output("docker exec worker-1 cat /opt/ComfyUI/comfy_extras/nodes_extra.py")
        == "# a subfolder's module"
    )

    # Back to the production default: the checkout returns and so does the earlier image.
    run = converge_worker()
    assert run.rc == 0, run.output[-3000:]
    assert gpu_host.file(f"{WORKER_DIR}/ComfyUI/.git").is_directory
    assert not gpu_host.file(f"{WORKER_DIR}/ComfyUI/comfy_extras").exists
    assert inspect(gpu_host, "worker-1")["State"]["Health"]["Status"] == "healthy"


def test_a_truncated_tarball_is_refused_and_replaced(gpu_host):
    """A host without the image finds a corrupt tarball in the cache: never loaded, rebuilt."""
    tag = running_tag(gpu_host)
    tarball = f"{CACHE}/comfyui-worker_{tag}.tar.zst"
    size = gpu_host.file(tarball).size
    gpu_host.check_output(f"truncate -s {size // 2} {tarball}")
    gpu_host.check_output(f"cd {WORKER_DIR} && docker compose down")
    gpu_host.check_output(f"docker image rm comfyui-worker:{tag}")
    run = converge_worker()
    assert run.rc == 0, run.output[-3000:]
    record = json.loads(gpu_host.file("/var/lib/comfyume/worker-image.json").content_string)
    assert record["source"] == "build", record
    assert record["refused"] and "does not match" in record["refused"][0]
    assert [s["step"] for s in record["steps"]][:2] == ["present", "verify"]
    assert "load" not in [s["step"] for s in record["steps"]]
    check = gpu_host.run(f"cd {CACHE} && sha256sum -c comfyui-worker_{tag}.tar.zst.sha256")
    assert check.rc == 0, check.stdout + check.stderr
    assert running_tag(gpu_host) == tag


def test_a_host_without_the_image_loads_it_from_the_cache(gpu_host):
    tag = running_tag(gpu_host)
    gpu_host.check_output(f"cd {WORKER_DIR} && docker compose down")
    gpu_host.check_output(f"docker image rm comfyui-worker:{tag}")
    run = converge_worker()
    assert run.rc == 0, run.output[-3000:]
    assert f"comfyui-worker:{tag} from cache" in run.output
    record = json.loads(gpu_host.file("/var/lib/comfyume/worker-image.json").content_string)
    assert [s["step"] for s in record["steps"]] == ["present", "verify", "load"]
    assert inspect(gpu_host, "worker-1")["State"]["Health"]["Status"] == "healthy"


def test_an_unwritable_cache_fails_naming_the_variable(gpu_host):
    tag = running_tag(gpu_host)
    ro = "/mnt/ro-cache"
    gpu_host.check_output(f"mkdir -p {ro}/images && mount --bind -o ro {ro} {ro}")
    try:
        gpu_host.check_output(f"docker image tag comfyui-worker:{tag} comfyui-worker:keep")
        gpu_host.check_output(f"cd {WORKER_DIR} && docker compose down")
        gpu_host.check_output(f"docker image rm comfyui-worker:{tag}")
        run = converge_worker(worker_image_cache_dir=f"{ro}/images")
        assert run.rc != 0
        assert f"worker_image_cache_dir {ro}/images is not writable on verda-sim" in run.output
    finally:
        gpu_host.run(f"umount {ro}")
        gpu_host.run(f"docker image tag comfyui-worker:keep comfyui-worker:{tag}")
        gpu_host.run("docker image rm comfyui-worker:keep")
    run = converge_worker()
    assert run.rc == 0, run.output[-3000:]
