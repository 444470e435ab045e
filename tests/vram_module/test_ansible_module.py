"""The module as Ansible runs it: ad hoc over a local connection, ansible-doc, and the
sanity checks that fit a module kept in library/ (no collection, so no ansible-test)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from localplay import BIN, REPO, ansible_doc, doc_block, imported_roots, module_env, run_adhoc
from vram_helpers import FIXTURES, MODULE_PATH


def vram_env(path_prefix: Path | None = None) -> dict[str, str]:
    # A PATH without any real nvidia-smi, plus the fake one when given.
    base = [str(BIN), "/usr/local/bin", "/usr/bin", "/bin"]
    path = os.pathsep.join(([str(path_prefix)] if path_prefix else []) + base)
    return module_env(REPO / "library", PATH=path)


def vram(args: str, *, path_prefix: Path | None = None, check: bool = False) -> dict:
    return run_adhoc("gpu_vram", args, env=vram_env(path_prefix), check=check)


@pytest.fixture
def fake_smi(tmp_path: Path) -> Path:
    """A directory holding an nvidia-smi that only replays the recorded H200 outputs."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--query-gpu=*) cat "{FIXTURES / "h200_8gpu_query_gpu_before.csv"}" ;;\n'
        f'  *--query-compute-apps=*) cat "{FIXTURES / "h200_8gpu_compute_apps_before.csv"}" ;;\n'
        f'  "") cat "{FIXTURES / "h200_nvidia_smi_banner.txt"}" ;;\n'
        '  *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return tmp_path


def test_adhoc_reads_the_replayed_h200(fake_smi):
    result = vram("backend=nvidia-smi facts=true", path_prefix=fake_smi)
    assert result["_rc"] == 0, result
    assert result["changed"] is False
    assert result["backend"] == "nvidia-smi"
    assert result["gpu_count"] == 8
    assert result["driver_version"] == "570.211.01"
    assert result["cuda_version"] == "12.8"
    assert result["gpus"][7]["memory_free_mb"] == 85700
    assert result["gpus"][7]["processes"][0]["pid"] == 1758887
    facts = result["ansible_facts"]
    assert facts["comfyume_gpu_count"] == 8
    assert facts["comfyume_gpu_backend"] == "nvidia-smi"


def test_adhoc_auto_falls_back_when_nvml_is_missing(fake_smi):
    result = vram("gpus=7", path_prefix=fake_smi)
    assert result["_rc"] == 0, result
    assert result["backend"] == "nvidia-smi"
    assert [gpu["index"] for gpu in result["gpus"]] == [7]


def test_adhoc_gate_fails_with_the_numbers(fake_smi):
    result = vram("min_free_mb=20000 safety_margin_mb=2048", path_prefix=fake_smi)
    assert result["_rc"] != 0
    assert result.get("failed") is True
    assert result["msg"].startswith("GPU memory below min_free_mb=20000 MiB on 3 of 8 GPU(s)")
    assert "13758 MiB free - 2048 MiB margin = 11710 MiB available" in result["msg"]
    assert result["gate"]["failing"] == [0, 1, 3]


def test_adhoc_check_mode_is_unchanged(fake_smi):
    result = vram("gpus=7 min_free_mb=20000", path_prefix=fake_smi, check=True)
    assert result["_rc"] == 0, result
    assert result["changed"] is False
    assert result["gate"]["passed"] is True


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has nvidia-smi")
def test_adhoc_on_this_gpu_less_host_is_one_line():
    """No libnvidia-ml and no nvidia-smi here: the module's real no-GPU path."""
    result = vram("")
    assert result["_rc"] != 0
    assert result["msg"].startswith("no NVIDIA GPU or driver on this host: ")
    assert "nvidia-smi: not found" in result["msg"]
    assert "\n" not in result["msg"]
    assert "Traceback" not in str(result.get("exception", ""))


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has nvidia-smi")
def test_adhoc_allow_no_gpu_reports_zero():
    result = vram("facts=true allow_no_gpu=true")
    assert result["_rc"] == 0, result
    assert result["gpu_count"] == 0
    assert result["ansible_facts"]["comfyume_gpu_count"] == 0
    assert result["ansible_facts"]["comfyume_gpu_backend"] == "none"
    gated = vram("allow_no_gpu=true min_free_mb=1")
    assert gated["_rc"] != 0
    assert "no GPU was found" in gated["msg"]


def test_adhoc_bad_selector_is_one_line(fake_smi):
    result = vram("gpus=GPU-nope", path_prefix=fake_smi)
    assert result["_rc"] != 0
    assert result["msg"].startswith("no GPU matches 'GPU-nope'; this host has: 0 (GPU-a446")


def test_ansible_doc_renders():
    proc = ansible_doc("--json", "gpu_vram", env=vram_env())
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)["gpu_vram"]
    assert doc["doc"]["module"] == "gpu_vram"
    assert doc["examples"] and doc["return"]["gpus"]["contains"]["memory_free_mb"]
    text = ansible_doc("gpu_vram", env=vram_env())
    assert text.returncode == 0 and "min_free_mb" in text.stdout
    assert "ERROR" not in text.stderr


# ---- sanity checks ----------------------------------------------------------------------


def test_documentation_matches_argument_spec_exactly(gv):
    options = yaml.safe_load(doc_block(MODULE_PATH, "DOCUMENTATION"))["options"]
    spec = gv.ARGUMENT_SPEC
    assert set(options) == set(spec)
    for name, arg in spec.items():
        documented = options[name]
        assert documented["type"] == arg["type"], name
        assert documented.get("default") == arg.get("default"), name
        assert documented.get("choices") == arg.get("choices"), name
        assert documented.get("elements") == arg.get("elements"), name
        assert documented.get("required", False) == arg.get("required", False), name
        assert documented["description"], name


def test_examples_use_only_documented_options(gv):
    for task in yaml.safe_load(doc_block(MODULE_PATH, "EXAMPLES")):
        if "gpu_vram" in task:
            assert set(task["gpu_vram"] or {}) <= set(gv.ARGUMENT_SPEC), task["name"]


def test_return_documents_every_gpu_key(gv):
    returned = yaml.safe_load(doc_block(MODULE_PATH, "RETURN"))
    gpu_keys = set(returned["gpus"]["contains"])
    reading = gv.read_nvml(__import__("fake_nvml").FakeNvml(__import__("fake_nvml").h200_pair()))
    produced = set(gv.apply_margin(reading["gpus"], 0)[0])
    assert produced == gpu_keys
    assert {"backend", "driver_version", "cuda_version", "gpu_count", "gpus", "gate"} <= set(
        returned
    )


def test_imports_are_stdlib_ansible_or_pynvml():
    roots = imported_roots(MODULE_PATH)
    assert roots <= {"__future__", "re", "traceback", "ansible", "pynvml"}
