"""Runs of the real playbooks against the converged hosts: check mode reports nothing,
data is never destroyed, and bad input fails at role entry naming the variable."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, TIMEOUTS, apply_role, recap, run_playbook


def test_check_diff_on_the_converged_hosts_reports_nothing():
    run = run_playbook(REPO / "site.yml", "--check", "--diff")
    assert run.rc == 0, run.output[-3000:]
    hosts = recap(run.output)
    assert hosts, run.output[-3000:]
    assert all(counts["changed"] == 0 for counts in hosts.values()), hosts
    # --diff prints a diff for every would-be change; there must be none.
    assert not re.search(r"^[-+]{3} (before|after)", run.output, re.MULTILINE), run.output


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


def test_file_where_a_link_goes_stops_the_play_when_data_is_itself_a_link(gpu_host):
    """data/ may be a link to another disk: what sits inside it is still protected."""
    project = "/home/dev/safety-linked"
    gpu_host.check_output(
        f"mkdir -p {project} /srv/elsewhere-data && ln -sfn /srv/elsewhere-data {project}/data"
        " && echo precious > /srv/elsewhere-data/models"
    )
    run = apply_role("project", project_dir=project)
    assert run.rc != 0
    assert f"{project}/data/models is a regular file" in run.output
    kept = gpu_host.file("/srv/elsewhere-data/models")
    assert kept.is_file and not kept.is_symlink
    assert kept.content_string == "precious\n"


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
    assert "worker_timeouts.job (600 s) must be at least worker_timeouts.comfyui_http (900 s)" in (
        run.output
    )
    hosts = recap(run.output)
    assert all(counts["changed"] == 0 for counts in hosts.values()), hosts
    # The preflight play stopped the run: no role's task ran.
    assert "Install ufw and fail2ban" not in run.output
