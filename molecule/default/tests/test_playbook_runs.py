"""Runs of the real playbooks against the converged hosts: check mode reports nothing,
data is never destroyed, and bad input fails at role entry naming the variable."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import REPO, TIMEOUTS, apply_role, inspect, recap, run_playbook


def test_check_diff_on_the_converged_hosts_reports_nothing():
    run = run_playbook(REPO / "site.yml", "--check", "--diff")
    assert run.rc == 0, run.output[-3000:]
    hosts = recap(run.output)
    assert hosts, run.output[-3000:]
    assert all(counts["changed"] == 0 for counts in hosts.values()), hosts
    # --diff prints a diff for every would-be change; there must be none.
    assert not re.search(r"^[-+]{3} (before|after)", run.output, re.MULTILINE), run.output


def wait_healthy(host, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inspect(host, name)["State"].get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(2)
    raise AssertionError(f"{name} did not become healthy within {timeout:g} s")


def test_check_mode_with_a_worker_stopped_reports_it_and_runs_every_play(gpu_host):
    """Check mode says which worker it would start, waits for nothing, and the app server's
    play after the workers' still runs (a failed worker play used to end the run there)."""
    gpu_host.check_output("docker stop worker-2")
    try:
        run = run_playbook(REPO / "site.yml", "--check", "--diff", "--tags", "worker,appserver")
        assert inspect(gpu_host, "worker-2")["State"]["Running"] is False  # nothing started
    finally:
        gpu_host.check_output("docker start worker-2")
        wait_healthy(gpu_host, "worker-2")
    assert run.rc == 0, run.output[-3000:]
    out = run.flat
    assert "Check mode: Compose would start container worker-2; nothing was started" in out
    hosts = recap(run.output)
    assert hosts["verda-sim"]["failed"] == 0 and hosts["verda-sim"]["changed"] >= 1, hosts
    assert "PLAY [Render the proxy timeouts for the app server's nginx]" in run.output
    assert hosts["app-server"]["failed"] == 0 and hosts["app-server"]["changed"] == 0, hosts


def test_prefilled_scratch_device_is_mounted_and_keeps_its_files(gpu_host):
    run = apply_role(
        "storage",
        storage_sfs_enabled=False,
        storage_scratch_device="/dev/vdc",
        storage_scratch_mount_point="/mnt/prefilled",
    )
    assert run.rc == 0, run.output[-3000:]
    assert gpu_host.mount_point("/mnt/prefilled").exists
    kept = gpu_host.file("/mnt/prefilled/outputs/alice/result.txt")
    assert kept.content_string == "workshop output, must survive\n"
    # The filesystem made in prepare, not a new one.
    assert (
        gpu_host.check_output("blkid --probe --match-tag LABEL --output value /dev/vdc") == "keepme"
    )


def test_scratch_directory_that_is_a_link_is_refused_and_its_target_left_alone(gpu_host):
    """The file module would follow a link where a scratch directory goes and give the
    storage role's owner and mode to whatever it points at: the role stops and names it."""
    prefilled = {
        "storage_sfs_enabled": False,
        "storage_scratch_device": "/dev/vdc",
        "storage_scratch_mount_point": "/mnt/prefilled",
    }
    elsewhere = "/srv/links-scratch-elsewhere"
    temp = "/mnt/prefilled/temp"
    run = apply_role("storage", **prefilled)  # mounted, with its directories
    assert run.rc == 0, run.output[-3000:]
    gpu_host.check_output(
        f"rm -rf {elsewhere} && mkdir -m 0700 {elsewhere}"
        f" && rmdir {temp} && ln -s {elsewhere} {temp}"
    )
    try:
        run = apply_role("storage", **prefilled)
        out = run.flat
        assert run.rc != 0, run.output[-3000:]
        assert (
            f"{temp} is a link to {elsewhere}, where the storage role keeps a directory of the"
            " scratch disk (dev:dev, mode 0775)" in out
        )
        assert "The storage role changed no owner or mode there" in out
        assert gpu_host.check_output(f"stat -c '%U:%G %a' {elsewhere}") == "root:root 700"
        assert gpu_host.file(temp).linked_to == elsewhere
    finally:
        gpu_host.check_output(
            f"if [ -L {temp} ]; then rm {temp}; fi && mkdir -p {temp}"
            f" && chown dev:dev {temp} && chmod 0775 {temp} && rm -rf {elsewhere}"
        )


def test_device_with_a_foreign_signature_is_refused_untouched(gpu_host):
    """prepare put a swap signature on /dev/vdd: the play stops, nothing is formatted."""
    before = gpu_host.check_output("sha256sum /dev/vdd")
    run = apply_role(
        "storage",
        storage_sfs_enabled=False,
        storage_scratch_device="/dev/vdd",
        storage_scratch_mount_point="/mnt/refused",
    )
    assert run.rc != 0
    assert "Nothing was formatted" in run.output
    assert "TYPE=swap" in run.output
    assert gpu_host.check_output("sha256sum /dev/vdd") == before
    assert not gpu_host.mount_point("/mnt/refused").exists


# A device with no signature that is not blank (CONTRACTS §3: formatting one destroys
# workshop data). Both layouts go onto /dev/vdd, which is given its swap signature back after.
DISK_HELPERS = REPO / "tests" / "disk_probe" / "disk_helpers.py"


@pytest.fixture
def vdd(gpu_host):
    """/dev/vdd for one test; afterwards blank with its swap signature again, as prepare left it."""
    yield "/dev/vdd"
    gpu_host.run("umount /mnt/refused /mnt/wiped")
    gpu_host.check_output(r"sed -i '\| /mnt/wiped |d' /etc/fstab")
    gpu_host.check_output("blkdiscard --zeroout /dev/vdd && mkswap --label notafs /dev/vdd")


def put_tar_archive(host, device: str) -> None:
    """The first incident: a tar archive written to the raw device."""
    host.check_output(f"blkdiscard --zeroout {device} && tar -cf {device} -C /etc ssh apt")


def put_ext4_behind_an_erased_gpt(host, device: str) -> None:
    """The second incident: a GPT with an ext4 partition at 1 MiB holding files, then
    `wipefs -a` on the disk. Built in an image by the unit tests' own helpers (run by the
    simulated host's Python), then copied onto the device."""
    helpers = "/root/disk-probe/tests/disk_probe"
    size = int(host.check_output(f"blockdev --getsize64 {device}"))
    host.check_output(
        f"mkdir -p {helpers} && cat > {helpers}/disk_helpers.py <<'PYEOF'\n"
        f"{DISK_HELPERS.read_text()}PYEOF"
    )
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        f"sys.path.insert(0, {helpers!r})\n"
        "import disk_helpers as d\n"
        "content = d.populated_dir(Path('/root/vdd-src'))\n"
        f"d.ext4_behind_erased_gpt(Path('/root/vdd.img'), {size}, content)\n"
    )
    host.check_output(f"python3 - <<'PYEOF'\n{script}PYEOF")
    host.check_output(
        f"blkdiscard --zeroout {device}"
        f" && dd if=/root/vdd.img of={device} bs=1M conv=sparse,notrunc,fsync status=none"
        " && rm -rf /root/vdd.img /root/vdd-src /root/disk-probe"
    )
    assert host.run(f"blkid --probe {device}").rc == 2  # no signature at all ...
    found = host.check_output(f"blkid --probe --offset 1048576 --output value -s TYPE {device}")
    assert found == "ext4"  # ... and the filesystem intact at 1 MiB


@pytest.mark.parametrize(
    ("put", "found"),
    [
        (put_tar_archive, "non-zero data in the first 1 MiB (from byte 0)"),
        (put_ext4_behind_an_erased_gpt, "a filesystem (ext4) at byte offset 1048576 (1 MiB)"),
    ],
    ids=["tar archive", "ext4 behind an erased GPT"],
)
def test_device_without_a_signature_that_is_not_blank_is_refused_untouched(
    gpu_host, vdd, put, found
):
    put(gpu_host, vdd)
    before = gpu_host.check_output(f"sha256sum {vdd}")
    run = apply_role(
        "storage",
        storage_sfs_enabled=False,
        storage_scratch_device=vdd,
        storage_scratch_mount_point="/mnt/refused",
    )
    out = run.flat
    assert run.rc != 0
    assert f"{vdd} carries no filesystem but is not blank" in out
    assert found in out
    assert "Nothing was formatted" in out
    assert "storage_scratch_wipe_nonblank=true" in out
    assert gpu_host.check_output(f"sha256sum {vdd}") == before
    assert not gpu_host.mount_point("/mnt/refused").exists


def test_wipe_nonblank_wipes_formats_and_mounts_it(gpu_host, vdd):
    put_tar_archive(gpu_host, vdd)
    run = apply_role(
        "storage",
        storage_sfs_enabled=False,
        storage_scratch_device=vdd,
        storage_scratch_mount_point="/mnt/wiped",
        storage_scratch_wipe_nonblank=True,
    )
    assert run.rc == 0, run.output[-3000:]
    mount = gpu_host.mount_point("/mnt/wiped")
    assert mount.exists and mount.filesystem == "ext4"
    assert gpu_host.file("/mnt/wiped/outputs").is_directory
    assert not gpu_host.file("/mnt/wiped/ssh").exists


def test_missing_scratch_device_is_an_error_naming_the_variable(gpu_host):
    run = apply_role(
        "storage",
        storage_sfs_enabled=False,
        storage_scratch_device="/dev/vdz",
        storage_scratch_mount_point="/mnt/refused",
    )
    assert run.rc != 0
    assert "storage_scratch_device: /dev/vdz does not exist" in run.flat
    assert not gpu_host.mount_point("/mnt/refused").exists


def test_real_directory_where_a_link_goes_stops_the_play_and_is_kept(gpu_host):
    project = "/home/dev/safety-check"
    gpu_host.check_output(
        f"mkdir -p {project}/data/outputs/bob && echo precious > {project}/data/outputs/bob/out.png"
    )
    run = apply_role("project", project_dir=project)
    assert run.rc != 0
    assert f"{project}/data/outputs is a real directory holding" in run.output
    assert gpu_host.file(f"{project}/data/outputs").is_directory
    assert not gpu_host.file(f"{project}/data/outputs").is_symlink
    assert gpu_host.file(f"{project}/data/outputs/bob/out.png").content_string == "precious\n"
    # No link was created inside it either.
    assert gpu_host.run(f"find {project}/data/outputs -type l").stdout == ""


def test_file_where_a_link_goes_stops_the_play_and_is_kept(gpu_host):
    """A file is protected as a directory is. (data/ itself as a link is refused before this:
    test_project.py.)"""
    project = "/home/dev/safety-file"
    gpu_host.check_output(
        f"rm -rf {project} && mkdir -p {project}/data && echo precious > {project}/data/models"
    )
    try:
        run = apply_role("project", project_dir=project)
        assert run.rc != 0
        assert f"{project}/data/models is a regular file" in run.output
        assert "It was left as it is" in run.flat
        kept = gpu_host.file(f"{project}/data/models")
        assert kept.is_file and not kept.is_symlink
        assert kept.content_string == "precious\n"
    finally:
        gpu_host.check_output(f"rm -rf {project}")


@pytest.mark.parametrize(
    ("extra", "variable", "expected"),
    [
        ({"storage_sfs_nconnect": "many"}, "storage_sfs_nconnect", "int"),
        ({"storage_scratch_fstype": "ntfs"}, "storage_scratch_fstype", "ext4, xfs"),
        ({"firewall_default_incoming": "allow"}, "firewall_default_incoming", "deny, reject"),
        ({"project_data_links": ["models"]}, "project_data_links", "dict"),
        ({"worker_queue_mode": "lifo"}, "worker_queue_mode", "fifo, priority, round_robin"),
    ],
)
def test_bad_input_fails_at_role_entry_naming_the_variable(extra, variable, expected):
    role = variable.split("_", 1)[0]
    run = apply_role(role, **extra)
    assert run.rc != 0
    assert "Validating arguments against arg spec" in run.output
    assert variable in run.output
    assert expected in run.output


def test_unreachable_optional_sfs_share_warns_and_the_play_goes_on(gpu_host):
    run = apply_role(
        "storage",
        storage_scratch_enabled=False,
        storage_sfs_fstype="nfs",
        storage_sfs_nconnect=16,
        storage_sfs_extra_options=[],
        storage_sfs_src="127.0.0.1:/SFS-missing",
        storage_sfs_mount_point="/mnt/sfs-missing",
    )
    assert run.rc == 0, run.output[-3000:]
    assert "WARNING: the SFS share 127.0.0.1:/SFS-missing is not mounted" in run.output
    assert not gpu_host.mount_point("/mnt/sfs-missing").exists
    fstab = gpu_host.file("/etc/fstab").content_string
    assert "127.0.0.1:/SFS-missing /mnt/sfs-missing nfs _netdev,nofail,nconnect=16" in fstab


def test_unreachable_required_sfs_share_fails_with_a_clear_message():
    run = apply_role(
        "storage",
        storage_scratch_enabled=False,
        storage_sfs_fstype="nfs",
        storage_sfs_required=True,
        storage_sfs_extra_options=[],
        storage_sfs_src="127.0.0.1:/SFS-missing",
        storage_sfs_mount_point="/mnt/sfs-missing",
    )
    assert run.rc != 0
    assert "The SFS share 127.0.0.1:/SFS-missing is unreachable" in run.output
    assert "storage_sfs_required" in run.output


def test_inconsistent_timeouts_fail_before_anything_changes():
    broken = {**TIMEOUTS, "job": 600, "heartbeat_interval": 90}
    run = run_playbook(REPO / "site.yml", "-e", json.dumps({"comfyume_timeouts": broken}))
    assert run.rc != 0
    # The worker's own rules (comfyui-worker/config.py), run by the preflight on the rendered .env.
    assert "WORKER_JOB_TIMEOUT (600) must be >= COMFYUI_TIMEOUT (900)" in run.output
    assert "WORKER_JOB_TIMEOUT is worker_timeouts.job" in run.output
    hosts = recap(run.output)
    assert all(counts["changed"] == 0 for counts in hosts.values()), hosts
    # The preflight play stopped the run: no role's task ran.
    assert "Install ufw and fail2ban" not in run.output
