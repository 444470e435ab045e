"""The scratch disk and the SFS share, as the storage role leaves them."""

from __future__ import annotations


def fstab_entry(host, mount_point: str) -> list[str]:
    lines = [
        line.split()
        for line in host.file("/etc/fstab").content_string.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    matches = [fields for fields in lines if len(fields) >= 4 and fields[1] == mount_point]
    assert len(matches) == 1, f"expected one fstab entry for {mount_point}, got {matches}"
    return matches[0]


def test_scratch_is_mounted_ext4_by_uuid(gpu_host):
    mount = gpu_host.mount_point("/mnt/scratch")
    assert mount.exists
    assert mount.filesystem == "ext4"
    assert mount.device == "/dev/vdb"
    src, _, fstype, opts = fstab_entry(gpu_host, "/mnt/scratch")[:4]
    uuid = gpu_host.check_output("blkid --probe --match-tag UUID --output value /dev/vdb")
    assert src == f"UUID={uuid}"
    assert fstype == "ext4"
    assert "nofail" in opts.split(",")


def test_scratch_directories_belong_to_dev(gpu_host):
    for name in ("outputs", "inputs", "temp"):
        d = gpu_host.file(f"/mnt/scratch/{name}")
        assert d.is_directory, name
        assert d.user == "dev"
        assert d.group == "dev"


def test_second_converge_kept_the_scratch_filesystem(gpu_host):
    """side_effect wrote a sentinel, then converged again: both must survive."""
    sentinel = gpu_host.file("/mnt/scratch/outputs/.sentinel")
    assert sentinel.exists
    assert "written before the second converge" in sentinel.content_string
    before = gpu_host.file("/root/scratch-uuid-before").content_string.strip()
    now = gpu_host.check_output("findmnt --noheadings --output UUID --mountpoint /mnt/scratch")
    assert before and before == now


def test_sfs_share_is_mounted_with_netdev_and_nofail(gpu_host):
    assert gpu_host.mount_point("/mnt/sfs").exists
    src, _, _, opts = fstab_entry(gpu_host, "/mnt/sfs")[:4]
    assert src == "/srv/sfs-export"
    options = opts.split(",")
    assert "_netdev" in options
    assert "nofail" in options
    for name in ("models", "cache", "tmp"):
        assert gpu_host.file(f"/mnt/sfs/{name}").is_directory
