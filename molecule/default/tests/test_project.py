"""The dev account, the project directory and its data/ links."""

from __future__ import annotations

import pytest
from conftest import apply_role, recap

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


# ---- links that cannot be tricked -----------------------------------------------------------
# Each test gives the role a project directory of its own (the deployed one stays as it is),
# makes its data/ a link, and afterwards puts back everything the play could have touched.


def owner_and_mode(host, path: str) -> str:
    """Of the path itself, not of what it may point at."""
    return host.check_output(f"stat -c '%U:%G %a' {path}")


def lexists(host, path: str) -> bool:
    """True for a dangling or circular link too (test -e follows links)."""
    return host.run(f"test -e {path} -o -L {path}").rc == 0


@pytest.fixture
def data_linked_to(gpu_host):
    """data_linked_to(target) -> a project directory whose data/ is a link to target.
    Afterwards the project directory is gone, and target is as it was: its owner and mode, and
    no link of LINKS' names in it where there was none (the code this guards against put them
    there, or swapped an empty directory for one)."""
    made: list[tuple[str, str, str, dict[str, str | None]]] = []

    def make(target: str) -> str:
        project = f"/home/dev/links-trap-{len(made)}"
        before = {
            name: owner_and_mode(gpu_host, f"{target}/{name}")
            if gpu_host.file(f"{target}/{name}").is_directory
            and not gpu_host.file(f"{target}/{name}").is_symlink
            else None
            for name in LINKS
        }
        made.append((project, target, owner_and_mode(gpu_host, target), before))
        gpu_host.check_output(f"mkdir -p {project} && ln -sfn {target} {project}/data")
        return project

    yield make
    for project, target, mode, before in made:
        gpu_host.check_output(f"rm -rf {project}")  # removes the data link, not its target
        for name, was in before.items():
            path = f"{target}/{name}"
            if gpu_host.file(path).is_symlink:
                gpu_host.check_output(f"rm {path}")
            if was is not None:
                owner, perms = was.split()
                gpu_host.check_output(
                    f"mkdir -p {path} && chown {owner} {path} && chmod {perms} {path}"
                )
        owner, perms = mode.split()
        gpu_host.check_output(f"chown {owner} {target} && chmod {perms} {target}")


def assert_refused_untouched(gpu_host, run, project: str, target: str, before: str) -> str:
    """The role stopped at data/, before any change, and left the link's target as it was."""
    out = run.flat
    assert run.rc != 0, run.output[-3000:]
    assert f"{project}/data is a link to {target}, not a directory of the project" in out
    assert "The project role stopped before changing anything" in out
    assert f"Remove the link (rm {project}/data, which leaves {target} and what it holds" in out
    counts = recap(run.output)["verda-sim"]
    assert counts["changed"] == 0 and counts["failed"] == 1, counts
    assert owner_and_mode(gpu_host, target) == before
    for name in LINKS:
        assert not gpu_host.file(f"{target}/{name}").is_symlink, f"{target}/{name}"
    assert gpu_host.file(f"{project}/data").linked_to == target  # the link is left as it is
    return out


def test_data_linked_to_the_scratch_outputs_is_refused_before_anything_changes(
    gpu_host, data_linked_to
):
    """The trap of CONTRACTS §3: data -> /mnt/scratch/outputs would put the circular link
    outputs -> /mnt/scratch/outputs inside its own target and flip the folder's mode."""
    target = LINKS["outputs"]
    before = owner_and_mode(gpu_host, target)
    project = data_linked_to(target)
    run = apply_role("project", project_dir=project)
    out = assert_refused_untouched(gpu_host, run, project, target, before)
    assert f"data/outputs -> {target} would be a circular link" in out
    assert not lexists(gpu_host, f"{target}/outputs")


@pytest.fixture
def root_only_folder(gpu_host):
    """A folder outside the project that only root may enter, with a file in it."""
    path = "/srv/links-root-only"
    gpu_host.check_output(
        f"rm -rf {path} && mkdir -m 0700 {path} && echo private > {path}/secret.txt"
    )
    yield path
    gpu_host.check_output(f"rm -rf {path}")


# root_only_folder before data_linked_to: it is removed after data_linked_to's clean-up.
def test_data_linked_to_a_root_only_folder_elsewhere_is_refused_and_left_alone(
    gpu_host, root_only_folder, data_linked_to
):
    project = data_linked_to(root_only_folder)
    run = apply_role("project", project_dir=project)
    assert_refused_untouched(gpu_host, run, project, root_only_folder, "root:root 700")
    assert gpu_host.check_output(f"ls -A {root_only_folder}") == "secret.txt"


def test_data_linked_to_the_scratch_disk_is_refused_with_a_true_message(gpu_host, data_linked_to):
    """data -> /mnt/scratch: data/outputs would be /mnt/scratch/outputs itself. The message
    says what would happen and what to do, not "Nothing was changed" after a chown, nor to
    move data/outputs onto itself."""
    before = owner_and_mode(gpu_host, "/mnt/scratch")
    project = data_linked_to("/mnt/scratch")
    run = apply_role("project", project_dir=project)
    out = assert_refused_untouched(gpu_host, run, project, "/mnt/scratch", before)
    assert (
        "data/outputs -> /mnt/scratch/outputs and data/inputs -> /mnt/scratch/inputs"
        " would be circular links" in out
    )
    assert "Nothing was changed" not in out
    assert "to /mnt/scratch/outputs (or elsewhere)" not in out
    for name in ("outputs", "inputs"):
        assert gpu_host.file(f"/mnt/scratch/{name}").is_directory


def test_a_repointed_data_link_names_its_old_target(gpu_host):
    project = "/home/dev/links-repoint"
    old = "/srv/links-old-outputs"
    gpu_host.check_output(
        f"rm -rf {project} && mkdir -p {project}/data && ln -s {old} {project}/data/outputs"
    )
    try:
        run = apply_role("project", project_dir=project)
        assert run.rc == 0, run.output[-3000:]
        assert f"data/outputs -> {LINKS['outputs']}, was -> {old}" in run.flat
        assert gpu_host.file(f"{project}/data/outputs").linked_to == LINKS["outputs"]
    finally:
        gpu_host.check_output(f"rm -rf {project}")
