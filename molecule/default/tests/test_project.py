"""The dev account, the project directory and its data/ links."""

from __future__ import annotations

import pytest

LINKS = {
    "models": "/mnt/sfs/models",
    "outputs": "/mnt/scratch/outputs",
    "inputs": "/mnt/scratch/inputs",
}


def test_dev_account_is_in_the_docker_group(gpu_host):
    dev = gpu_host.user("dev")
    assert dev.exists
    assert "docker" in dev.groups
    assert dev.home == "/home/dev"


def test_project_directory_belongs_to_dev(gpu_host):
    d = gpu_host.file("/home/dev/comfyume")
    assert d.is_directory
    assert d.user == "dev"


@pytest.mark.parametrize(("name", "target"), sorted(LINKS.items()))
def test_data_links_point_at_the_volumes(gpu_host, name, target):
    link = gpu_host.file(f"/home/dev/comfyume/data/{name}")
    assert link.is_symlink
    assert link.linked_to == target
    # The link itself (stat without -L), not its target.
    assert gpu_host.check_output(f"stat -c %U {link.path}") == "dev"
    # The target is a real directory on the mounted volume, not a loop back into data/.
    assert gpu_host.file(target).is_directory
    assert not gpu_host.file(f"{target}/{name}").is_symlink
