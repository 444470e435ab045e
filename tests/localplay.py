"""Ansible run by the tests on this machine: a playbook or an ad hoc module call on localhost
over a local connection, its output and recap, and a module file of this repository read as
plain Python.

Importable from every folder under tests/ (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[1]
ROLES = REPO / "roles"
BIN = Path(sys.executable).parent
# Settings for a run whose stdout is read as JSON, and for one on an inventory of "localhost,".
JSON_STDOUT = {
    "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
    "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
}
QUIET = {"ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0"}
RECAP_LINE = re.compile(r"^(\S+)\s+:\s+(ok=\d+(?:\s+\w+=\d+)*)\s*$", re.MULTILINE)


def ansible_env(
    home: Path | None = None, roles_path: Path | None = None, **settings: str | None
) -> dict[str, str]:
    """This process's environment with the repository's ansible.cfg and no colour; with `home`,
    an Ansible home and temporary folders of the test's own; then `settings` (None unsets)."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"
    )
    if roles_path is not None:
        env["ANSIBLE_ROLES_PATH"] = str(roles_path)
    if home is not None:
        env.update(
            ANSIBLE_HOME=str(home),
            ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
            ANSIBLE_REMOTE_TEMP=str(home / "tmp"),
        )
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def module_env(library: Path, home: Path | None = None, **settings: str | None) -> dict[str, str]:
    """ansible_env() for an ad hoc run of a module in `library`, its result printed as JSON."""
    return ansible_env(home, ANSIBLE_LIBRARY=str(library), **JSON_STDOUT, **QUIET, **settings)


def venv_path() -> str:
    """PATH with this virtual environment's bin folder first (ansible-* and its Python)."""
    return os.pathsep.join([str(BIN), os.environ.get("PATH", "")])


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP: {host: {"ok": n, "changed": n, ...}}."""
    return {
        host: {k: int(v) for k, v in (item.split("=") for item in counts.split())}
        for host, counts in RECAP_LINE.findall(stdout)
    }


class Run(subprocess.CompletedProcess[str]):
    """A finished ansible command, with its output read the ways the tests read it."""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def flat(self) -> str:
        """The output with its line breaks (Ansible's YAML-folded messages) undone."""
        return " ".join(self.output.split())

    @property
    def changed(self) -> int:
        """localhost's changed= in the recap; -1 without a recap."""
        return recap(self.stdout).get("localhost", {}).get("changed", -1)


def run(
    argv: Sequence[str | Path], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> Run:
    """Run a command to its end, its output captured as text; its exit status is not judged."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Run(proc.args, proc.returncode, proc.stdout, proc.stderr)


def run_local_playbook(
    workdir: Path,
    plays: list | Path,
    extra_vars: dict | None = None,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    secret_vars_file: bool = True,
    vars_files: Sequence[Path] = (),
) -> Run:
    """ansible-playbook on localhost over a local connection, on the controller's Python.

    `plays` is a playbook file, or plays written to workdir/playbook.yml. `vars_files` and then
    `extra_vars` are the extra vars: with `secret_vars_file`, in workdir/vars.json, made 0600
    before anything is written to it, so no value is on a command line; otherwise as JSON on
    the command line (which Ansible does not trust as a template, as it does a file). `env`
    is set on top of ansible_env() with an Ansible home in workdir and the repository's roles.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(plays, Path):
        playbook = plays
    else:
        playbook = workdir / "playbook.yml"
        playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    extra: list[str] = []
    for path in vars_files:
        extra += ["-e", f"@{path}"]
    if extra_vars is not None and secret_vars_file:
        path = workdir / "vars.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            os.fchmod(fd, 0o600)
            handle.write(json.dumps(extra_vars))
        extra += ["-e", f"@{path}"]
    elif extra_vars is not None:
        extra += ["-e", json.dumps(extra_vars)]
    argv = [BIN / "ansible-playbook", "-i", "localhost,", "-c", "local"]
    argv += ["-e", f"ansible_python_interpreter={sys.executable}", *extra, *args, playbook]
    return run(argv, ansible_env(workdir / "ansible-home", ROLES, **(env or {})), timeout)


def run_adhoc(
    module: str,
    args: str,
    *,
    env: dict[str, str],
    host: str = "localhost",
    connection: str = "local",
    extra_vars: dict | None = None,
    check: bool = False,
    timeout: float = 120,
) -> dict:
    """`ansible HOST -m MODULE -a ARGS` from the repository root, with `env` (module_env()'s
    JSON output); the host's result, with the command's exit status as "_rc". `extra_vars`
    default to the controller's Python as localhost's."""
    extra = (
        json.dumps(extra_vars)
        if extra_vars is not None
        else f"ansible_python_interpreter={sys.executable}"
    )
    argv = [BIN / "ansible", host, "-i", f"{host},", "-c", connection, "-e", extra]
    argv += ["-m", module, "-a", args, *(["--check"] if check else [])]
    proc = run(argv, env, timeout, cwd=REPO)
    assert "Traceback" not in proc.output, proc.output
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"][host]
    result["_rc"] = proc.returncode
    return result


def ansible_doc(*args: str, env: dict[str, str]) -> Run:
    """`ansible-doc ARGS` from the repository root."""
    return run([BIN / "ansible-doc", *args], env, 120, cwd=REPO)


def load_module(name: str, path: Path) -> ModuleType:
    """A module file of the repository imported as plain Python, as `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def doc_block(path: Path, name: str) -> str:
    """A module's DOCUMENTATION, EXAMPLES or RETURN string."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return node.value.value
    raise AssertionError(f"{name} missing")


def imported_roots(path: Path) -> set[str]:
    """The top-level packages a module file imports."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    return roots
