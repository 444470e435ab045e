"""Every role documents and validates what it takes: each default has a comment, an
argument-spec entry, and a row in the role's README; specs name nothing undefined."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "roles").iterdir() if p.is_dir())


def defaults(role: Path) -> dict:
    path = role / "defaults" / "main.yml"
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def spec_options(role: Path) -> dict:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"].get("options", {})


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_is_in_the_argument_spec(role):
    missing = sorted(set(defaults(role)) - set(spec_options(role)))
    assert not missing, f"{role.name}: defaults without an argument spec: {missing}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_variable_is_prefixed_with_the_role_name(role):
    names = set(defaults(role)) | set(spec_options(role))
    stray = sorted(n for n in names if not n.startswith(f"{role.name}_"))
    assert not stray, f"{role.name}: variables without the role prefix: {stray}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_has_a_comment_and_a_readme_row(role):
    path = role / "defaults" / "main.yml"
    if not path.exists():
        pytest.skip("no defaults")
    lines = path.read_text().splitlines()
    readme = (role / "README.md").read_text()
    for i, line in enumerate(lines):
        match = re.match(r"^([a-z0-9_]+):", line)
        if not match:
            continue
        assert lines[i - 1].lstrip().startswith("#"), f"{role.name}: {match[1]} has no comment"
        assert f"`{match[1]}`" in readme, f"{role.name}: {match[1]} is not in README.md"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_secrets_are_marked_no_log(role):
    for name, option in spec_options(role).items():
        if re.search(r"(password|authkey|secret|token)$", name):
            assert option.get("no_log") is True, f"{role.name}: {name} must be no_log"


def test_requirements_pin_the_collections_the_ansible_package_bundles():
    """requirements.yml must name the versions the venv actually runs."""
    import ansible_collections

    root = Path(ansible_collections.__path__[0])
    repo = Path(__file__).resolve().parents[1]
    wanted = yaml.safe_load((repo / "requirements.yml").read_text())["collections"]
    for item in wanted:
        namespace, name = item["name"].split(".")
        manifest = (root / namespace / name / "MANIFEST.json").read_text()
        bundled = re.search(r'"version":\s*"([^"]+)"', manifest)[1]
        assert item["version"] == bundled, (
            f"{item['name']}: pinned {item['version']}, bundled {bundled}"
        )


def included_task_files(node) -> set[str]:
    """Stems of the task files that include_tasks/import_tasks or tasks_from name in a YAML tree."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= included_task_files(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            short = str(key).rsplit(".", 1)[-1]
            if short in ("include_tasks", "import_tasks"):
                target = value.get("file") if isinstance(value, dict) else value
                if isinstance(target, str):
                    found.add(Path(target).stem)
            elif short in ("include_role", "import_role") and isinstance(value, dict):
                found |= {Path(v).stem for v in [value.get("tasks_from")] if isinstance(v, str)}
            found |= included_task_files(value)
    return found


def task_references(role: Path) -> set[str]:
    """Task files of a role named by its own tasks, the playbooks or the scenarios."""
    repo = role.parents[1]
    files = [*(role / "tasks").glob("*.yml"), *(repo / "playbooks").rglob("*.yml")]
    files += [*(repo / "molecule").rglob("*.yml")]
    named: set[str] = set()
    for path in files:
        named |= included_task_files(yaml.safe_load(path.read_text()))
    return named


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_task_file_is_included_by_some_task(role):
    """A task file that nothing includes is dead code that looks like it runs."""
    files = sorted(p.stem for p in (role / "tasks").glob("*.yml") if p.stem != "main")
    orphans = [name for name in files if name not in task_references(role)]
    assert not orphans, f"{role.name}: task files that no task includes: {orphans}"
