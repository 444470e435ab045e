"""GPU assertions for a real host: they skip unless the GPU switch is on (conftest)."""

from __future__ import annotations

import json
import re

import pytest
from gpu_switch import gpu_enabled

NVSWITCH_PROC = "/proc/driver/nvidia-nvswitch/devices"


@pytest.fixture
def gpu_host(host):
    if not gpu_enabled(host):
        pytest.skip("GPU checks are off (COMFYUME_GPU_ENABLED / comfyume_gpu_enabled)")
    return host


def smi_gpus(host) -> list[dict]:
    out = host.check_output(
        "nvidia-smi --query-gpu=index,uuid,memory.total,driver_version"
        " --format=csv,noheader,nounits"
    )
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]
    return [{"index": int(r[0]), "uuid": r[1], "total": int(r[2]), "driver": r[3]} for r in rows]


def worker_containers(host) -> list[str]:
    out = host.check_output(
        "docker ps --format '{{.Names}} {{.Label \"com.docker.compose.service\"}}'"
    )
    names = []
    for line in out.splitlines():
        name, _, service = line.partition(" ")
        if re.match(r"^worker-\d+$", service) or re.match(r"^worker-\d+$", name):
            names.append(name)
    return sorted(names)


def test_host_nvidia_smi_lists_the_gpus(gpu_host):
    listing = gpu_host.run("nvidia-smi -L")
    assert listing.rc == 0, listing.stderr or listing.stdout
    assert re.search(r"^GPU 0: NVIDIA ", listing.stdout, re.M), listing.stdout


def test_module_readings_match_nvidia_smi(gpu_host):
    result = gpu_host.ansible("gpu_vram", "facts=true", check=False)
    assert result.get("failed") is not True, result.get("msg")
    assert result["changed"] is False
    smi = smi_gpus(gpu_host)
    assert result["gpu_count"] == len(smi) > 0
    assert result["driver_version"] == smi[0]["driver"]
    assert result["cuda_version"]
    by_uuid = {gpu["uuid"]: gpu for gpu in result["gpus"]}
    for gpu in smi:
        reading = by_uuid[gpu["uuid"]]
        assert reading["index"] == gpu["index"]
        assert reading["memory_total_mb"] == gpu["total"]
        assert 0 <= reading["memory_free_mb"] <= gpu["total"]
    facts = result["ansible_facts"]
    assert facts["comfyume_gpu_count"] == len(smi)


def test_every_worker_sees_a_gpu(gpu_host):
    workers = worker_containers(gpu_host)
    assert workers, "no worker-N container is running"
    for name in workers:
        listing = gpu_host.run(f"docker exec {name} nvidia-smi -L")
        assert listing.rc == 0, f"{name}: {listing.stderr or listing.stdout}"
        assert "GPU 0:" in listing.stdout, f"{name}: {listing.stdout}"


def test_cuda_is_usable_inside_the_worker_image(gpu_host):
    """nvidia-smi works without fabricmanager on HGX; CUDA does not (error 802)."""
    workers = worker_containers(gpu_host)
    assert workers, "no worker-N container is running"
    probe = (
        "import json, torch; ok = torch.cuda.is_available(); "
        "x = torch.ones(1024, device='cuda').sum().item() if ok else None; "
        "print(json.dumps({'ok': ok, 'n': torch.cuda.device_count(), 'x': x}))"
    )
    for name in workers:
        # As the user ComfyUI runs as (docker exec alone is root).
        run = gpu_host.run(f'docker exec --user comfy {name} python3 -c "{probe}"')
        assert run.rc == 0, f"{name}: {run.stderr}"
        answer = json.loads(run.stdout.strip().splitlines()[-1])
        assert answer == {"ok": True, "n": answer["n"], "x": 1024.0}, f"{name}: {answer}"
        assert answer["n"] >= 1


def has_nvswitch(host) -> bool:
    if host.file(NVSWITCH_PROC).is_directory and host.run(f"ls -A {NVSWITCH_PROC}").stdout.strip():
        return True
    query = host.run("nvidia-smi -q")
    # HGX boards report a Fabric section whose state is not N/A.
    return bool(re.search(r"Fabric\s*\n\s*State\s*:\s*(?!N/A)\S", query.stdout))


def fabricmanager_version(host) -> str | None:
    out = host.run("nv-fabricmanager --version")
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
    if match:
        return match.group(1)
    pkg = host.run(
        "dpkg-query -W -f='${Version}\\n' 'nvidia-fabricmanager*' 2>/dev/null | head -n1"
    )
    match = re.match(r"(\d+\.\d+(?:\.\d+)?)", pkg.stdout.strip())
    return match.group(1) if match else None


def test_fabricmanager_runs_and_matches_the_driver_on_nvswitch_systems(gpu_host):
    if not has_nvswitch(gpu_host):
        pytest.skip("no NVSwitch on this host (PCIe GPUs): fabricmanager is not needed")
    service = gpu_host.service("nvidia-fabricmanager")
    assert service.is_enabled
    assert service.is_running
    driver = smi_gpus(gpu_host)[0]["driver"]
    assert fabricmanager_version(gpu_host) == driver
