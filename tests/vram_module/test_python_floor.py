"""The gpu_vram module keeps its word about the oldest Python it runs on.

The claim is in the module's docstring and its DOCUMENTATION. Three things hold it: ruff lints
the module for that version (pyproject.toml's per-file target), which catches syntax; a scan of
the module's tree refuses the features ruff cannot see (a keyword argument such as
``zip(strict=)``, a type union evaluated at run time, ...) that need a newer Python; and the
module runs through ``ansible`` on that very interpreter, on the NVML path and on the
nvidia-smi path, in the image of the simulated Ubuntu 22.04 host (molecule/ubuntu).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from localplay import BIN, REPO, module_env, run_adhoc, venv_path
from vram_helpers import FIXTURES, MODULE_PATH

HERE = Path(__file__).resolve().parent
IMAGE = "comfyume/ubuntu-sim:latest"

# Features a scan of the tree finds, with the Python that brought them. Syntax is ruff's
# (and ast.parse's) job; these are the ones that parse on any Python 3 and fail at run time.
KEYWORD_FEATURES = {
    ("zip", "strict"): (3, 10),
    ("dataclass", "slots"): (3, 10),
    ("dataclass", "kw_only"): (3, 10),
}
NAME_FEATURES = {
    "ExceptionGroup": (3, 11),
    "BaseExceptionGroup": (3, 11),
    "aiter": (3, 10),
    "anext": (3, 10),
    "EncodingWarning": (3, 10),
}
ATTRIBUTE_FEATURES = {
    "removeprefix": (3, 9),
    "removesuffix": (3, 9),
    "bit_count": (3, 10),
    "pairwise": (3, 10),
    "UTC": (3, 11),
    "batched": (3, 12),
    "add_note": (3, 11),
}
SYNTAX_FEATURES = {
    "Match": (3, 10),
    "TryStar": (3, 11),
    "TypeAlias": (3, 12),
}


def claimed_version() -> tuple[int, int]:
    """The version the module's docstring promises."""
    text = MODULE_PATH.read_text()
    found = re.search(r"the target side must run on Python (\d+)\.(\d+)", text)
    assert found, "gpu_vram.py's docstring no longer says which Python the target side needs"
    return int(found[1]), int(found[2])


CLAIM = claimed_version()
CLAIM_TEXT = "{}.{}".format(*CLAIM)


def features(source: str) -> list[tuple[tuple[int, int], str]]:
    """(version, description) of every version-gated feature the scan finds in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        kind = type(node).__name__
        if kind in SYNTAX_FEATURES:
            found.append((SYNTAX_FEATURES[kind], f"line {node.lineno}: {kind} statement"))
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            for keyword in node.keywords:
                version = KEYWORD_FEATURES.get((name, keyword.arg))
                if version:
                    found.append((version, f"line {node.lineno}: {name}({keyword.arg}=...)"))
            if name in ("isinstance", "issubclass") and len(node.args) == 2:
                for part in ast.walk(node.args[1]):
                    if isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr):
                        found.append(((3, 10), f"line {node.lineno}: {name}() with X | Y"))
                        break
        if isinstance(node, ast.Name) and node.id in NAME_FEATURES:
            found.append((NAME_FEATURES[node.id], f"line {node.lineno}: {node.id}"))
        if isinstance(node, ast.Attribute) and node.attr in ATTRIBUTE_FEATURES:
            found.append((ATTRIBUTE_FEATURES[node.attr], f"line {node.lineno}: .{node.attr}"))
    return found


# ---- the claim, the linter and the code agree -------------------------------------------


def test_the_documentation_makes_the_same_claim():
    tree = ast.parse(MODULE_PATH.read_text())
    (doc,) = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DOCUMENTATION"
    ]
    requirements = yaml.safe_load(doc)["requirements"]
    assert f"Python {CLAIM_TEXT} or later on the target." in requirements


# Syntax newer than a version, for ruff to refuse: the first one newer than the claim is used.
NEWER_SYNTAX = [
    ((3, 10), "match x:\n    case 1:\n        pass\n"),
    ((3, 11), "try:\n    pass\nexcept* ValueError:\n    pass\n"),
    ((3, 12), "type Alias = int\n"),
]


def test_ruff_lints_the_module_for_the_claimed_version():
    """pyproject.toml's per-file target: ruff refuses, in this file, syntax newer than the claim."""
    version, snippet = next((v, s) for v, s in NEWER_SYNTAX if v > CLAIM)
    ruff = [str(BIN / "ruff"), "check", "--no-cache", "--output-format", "concise"]
    proc = subprocess.run(
        [*ruff, "--stdin-filename", str(MODULE_PATH.relative_to(REPO)), "-"],
        input=snippet,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    wanted = f"on Python {CLAIM_TEXT} (syntax was added in Python {version[0]}.{version[1]})"
    assert wanted in proc.stdout, (
        "ruff must lint library/gpu_vram.py for the Python its docstring claims "
        f"(pyproject.toml [tool.ruff.per-file-target-version]); it said: {proc.stdout}"
    )


def test_the_module_parses_as_the_claimed_version():
    ast.parse(MODULE_PATH.read_text(), feature_version=CLAIM)


def test_the_module_uses_nothing_newer_than_it_claims():
    newer = [what for version, what in features(MODULE_PATH.read_text()) if version > CLAIM]
    assert not newer, f"gpu_vram.py claims Python {CLAIM_TEXT} but uses: {newer}"


def test_the_scan_finds_what_ruff_cannot():
    snippet = (
        "def f(a, b, x):\n"
        "    pairs = list(zip(a, b, strict=True))\n"
        "    ok = isinstance(x, int | str)\n"
        "    match x:\n"
        "        case 1:\n"
        "            pass\n"
        "    return 'x'.removeprefix('y'), ExceptionGroup\n"
    )
    found = dict((what.split(": ", 1)[1], version) for version, what in features(snippet))
    assert found == {
        "zip(strict=...)": (3, 10),
        "isinstance() with X | Y": (3, 10),
        "Match statement": (3, 10),
        ".removeprefix": (3, 9),
        "ExceptionGroup": (3, 11),
    }


# ---- the module run on the claimed interpreter -------------------------------------------


def why_no_image() -> str | None:
    """None when the image can be used, otherwise why not."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    proc = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        return (
            f"{IMAGE} (Ubuntu 22.04, Python 3.10) cannot be used here "
            f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'not found'}): "
            "molecule/resources/images/build.sh ubuntu builds it (molecule's ubuntu scenario does)"
        )
    return None


FAKE_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=*) cat /opt/fake-gpu/h200_8gpu_query_gpu_before.csv ;;
  *--query-compute-apps=*) cat /opt/fake-gpu/h200_8gpu_compute_apps_before.csv ;;
  "") cat /opt/fake-gpu/h200_nvidia_smi_banner.txt ;;
  *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"""

# The fake NVML of the unit tests, installed on the target as the pynvml module: one host with
# GPU 0 and 7 of the recorded H200 machine.
FAKE_PYNVML = """from fake_nvml import FakeNvml, h200_pair

_HOST = FakeNvml(h200_pair())


def __getattr__(name):
    return getattr(_HOST, name)
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A container of the simulated Ubuntu 22.04 host: its own Python, no network, no GPU."""
    why_not = why_no_image()
    if why_not:
        pytest.skip(why_not)
    name = f"gpu-vram-floor-{uuid.uuid4().hex[:8]}"
    run = ["docker", "run", "-d", "--rm", "--network", "none", "--name", name]
    subprocess.run(
        [*run, "--entrypoint", "sleep", IMAGE, "infinity"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        stage = tmp_path_factory.mktemp("fake-gpu")
        for fixture in (
            "h200_8gpu_query_gpu_before.csv",
            "h200_8gpu_compute_apps_before.csv",
            "h200_nvidia_smi_banner.txt",
        ):
            shutil.copy(FIXTURES / fixture, stage / fixture)
        (stage / "nvidia-smi").write_text(FAKE_SMI)
        (stage / "nvidia-smi").chmod(0o755)
        nvml = tmp_path_factory.mktemp("fake-nvml")
        shutil.copy(HERE / "fake_nvml.py", nvml / "fake_nvml.py")
        (nvml / "pynvml.py").write_text(FAKE_PYNVML)
        subprocess.run(["docker", "cp", f"{stage}/.", f"{name}:/opt/fake-gpu"], check=True)
        subprocess.run(["docker", "cp", f"{nvml}/.", f"{name}:/opt/fake-nvml"], check=True)
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


def interpreter(container: str) -> str:
    """The claimed Python of the image, by its versioned name, checked to be that version."""
    path = f"/usr/bin/python{CLAIM_TEXT}"
    proc = subprocess.run(
        ["docker", "exec", container, path, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (
        f"{IMAGE} has no {path}: the oldest Python the simulated hosts carry is no longer the "
        f"one gpu_vram.py claims ({CLAIM_TEXT}); {proc.stderr.strip()}"
    )
    assert proc.stdout.strip() == str(CLAIM)
    return path


def run_on(container: str, args: str, *, nvml: bool) -> dict:
    python = interpreter(container)
    env = module_env(REPO / "library", PATH=venv_path())
    # The fake pynvml is importable only on the NVML runs: PYTHONPATH reaches the module
    # through the connection's environment of the docker exec.
    extra = {"ansible_python_interpreter": python}
    if nvml:
        extra["ansible_docker_extra_env"] = {"PYTHONPATH": "/opt/fake-nvml"}
    return run_adhoc(
        "gpu_vram",
        args,
        env=env,
        host=container,
        connection="community.docker.docker",
        extra_vars=extra,
        timeout=180,
    )


def test_on_the_claimed_python_the_nvidia_smi_path_reads_the_replayed_h200(target):
    result = run_on(
        target, "backend=nvidia-smi nvidia_smi_path=/opt/fake-gpu/nvidia-smi facts=true", nvml=False
    )
    assert result["_rc"] == 0, result
    assert result["backend"] == "nvidia-smi"
    assert result["gpu_count"] == 8
    assert (result["driver_version"], result["cuda_version"]) == ("570.211.01", "12.8")
    assert result["gpus"][0]["memory_free_mb"] == 13758
    assert result["gpus"][7]["processes"][0]["pid"] == 1758887
    assert result["ansible_facts"]["comfyume_gpu_backend"] == "nvidia-smi"


def test_on_the_claimed_python_the_nvml_path_reads_the_fake_nvml(target):
    result = run_on(target, "backend=nvml facts=true", nvml=True)
    assert result["_rc"] == 0, result
    assert result["backend"] == "nvml"
    assert result["gpu_count"] == 2
    assert (result["driver_version"], result["cuda_version"]) == ("570.211.01", "12.8")
    first = result["gpus"][0]
    assert (first["memory_free_mb"], first["memory_reserved_mb"]) == (13758, 480)
    assert first["processes"][0]["name"] == "/usr/local/bin/python3.10"


def test_on_the_claimed_python_auto_without_nvml_falls_back_to_nvidia_smi(target):
    result = run_on(
        target, "nvidia_smi_path=/opt/fake-gpu/nvidia-smi min_free_mb=20000", nvml=False
    )
    assert result["_rc"] != 0
    assert result["backend"] == "nvidia-smi"
    assert result["gate"]["failing"] == [0, 1, 3]
