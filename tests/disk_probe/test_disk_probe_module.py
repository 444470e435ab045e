"""The module as Ansible runs it (ad hoc over a local connection, in check mode too),
ansible-doc, and the sanity checks that fit a role-local module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml
from disk_helpers import MIB, MODULE_PATH, populated_dir, sh, sha256, sparse_image
from localplay import ansible_doc, doc_block, imported_roots, module_env, run_adhoc


def probe(home: Path, args: str, *, check: bool = False) -> dict:
    env = module_env(MODULE_PATH.parent, home)
    return run_adhoc("disk_probe", args, env=env, check=check)


def test_adhoc_on_a_tar_archive_reports_and_changes_nothing(loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", 64 * MIB))
    populated_dir(tmp_path)
    sh("tar", "-cf", device, "-C", str(tmp_path), "outputs")
    before = sha256(device)
    for check in (False, True):
        result = probe(tmp_path / "home", f"device={device}", check=check)
        assert result["_rc"] == 0, result
        assert result["changed"] is False
        assert result["blank"] is False
        assert result["signature"] == {}
        assert result["nonzero_regions"][0]["place"] == "first"
        assert result["reasons"][0].startswith("non-zero data in the first 1 MiB")
    assert sha256(device) == before


def test_adhoc_on_a_fresh_volume_is_blank(loop, tmp_path):
    device = loop(sparse_image(tmp_path / "disk.img", 64 * MIB))
    result = probe(tmp_path / "home", f"device={device}")
    assert result["_rc"] == 0, result
    assert result["blank"] is True and result["reasons"] == []


def test_adhoc_on_a_missing_path_reports_it_without_failing(tmp_path):
    result = probe(tmp_path / "home", f"device={tmp_path}/vdz")
    assert result["_rc"] == 0, result
    assert result["exists"] is False and result["blank"] is False
    assert result["reasons"] == [f"{tmp_path}/vdz does not exist"]


def test_bad_options_fail_naming_them(tmp_path):
    result = probe(tmp_path / "home", "device=/dev/null region_bytes=1")
    assert result["_rc"] != 0
    assert "region_bytes must be at least 512" in result["msg"]


def test_ansible_doc_renders(tmp_path):
    proc = ansible_doc("--json", "disk_probe", env=module_env(MODULE_PATH.parent, tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)["disk_probe"]
    assert doc["doc"]["module"] == "disk_probe"
    assert {"blank", "reasons", "partitions", "holders", "signature", "nonzero_regions"} <= set(
        doc["return"]
    )


# ---- sanity checks ----------------------------------------------------------------------


def test_documentation_matches_argument_spec_exactly(dp):
    options = yaml.safe_load(doc_block(MODULE_PATH, "DOCUMENTATION"))["options"]
    assert set(options) == set(dp.ARGUMENT_SPEC)
    for name, arg in dp.ARGUMENT_SPEC.items():
        documented = options[name]
        assert documented["type"] == arg["type"], name
        assert documented.get("default") == arg.get("default"), name
        assert documented.get("elements") == arg.get("elements"), name
        assert documented.get("required", False) == arg.get("required", False), name


def test_return_documents_every_fact(dp, tmp_path):
    returned = set(yaml.safe_load(doc_block(MODULE_PATH, "RETURN")))
    produced = set(dp.probe(str(tmp_path), lambda argv: (2, "", "")))
    assert produced == returned


def test_target_side_code_parses_as_python_3_10():
    ast.parse(MODULE_PATH.read_text(), feature_version=(3, 10))


def test_imports_are_stdlib_or_ansible():
    assert imported_roots(MODULE_PATH) <= {"__future__", "errno", "os", "stat", "ansible"}


def test_the_module_opens_nothing_for_writing():
    """Read-only by construction: it opens with O_RDONLY (O_EXCL for the in-use check) and
    calls nothing that writes, removes or renames."""
    tree = ast.parse(MODULE_PATH.read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    flags = {name for name in attributes if name.startswith("O_")}
    assert flags == {"O_RDONLY", "O_EXCL"}, flags
    writers = {"write", "pwrite", "writelines", "truncate", "ftruncate", "unlink", "remove"}
    writers |= {"rename", "replace", "makedirs", "mkdir", "rmdir", "chmod", "chown", "ioctl"}
    assert not attributes & writers, attributes & writers
