"""One home for what every site shares: playbooks/group_vars/ holds the timeouts, the platform's
conventions and the wiring to the roles' variables; an inventory holds only its site's values.

Ansible loads group_vars/ beside the playbook a play comes from, so this folder reaches every
play of playbooks/*.yml, whether run alone, through site.yml or through a molecule scenario's
converge (which import them). It outranks an inventory's group_vars/all/ and is outranked by
its group_vars/<group>/, so a name set in both places would be silently ignored there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = REPO / "playbooks" / "group_vars"
INVENTORIES = REPO / "inventories"


def names_in(folder: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(folder.glob("**/*.yml")):
        for name in yaml.safe_load(path.read_text()) or {}:
            names[name] = path
    return names


def test_the_shared_values_are_set_for_every_host():
    """Only group_vars/all/: a playbook group_vars/<group>/ would outrank the inventories'."""
    assert sorted(p.name for p in SHARED.iterdir()) == ["all"]


def group_vars_in_file(node: dict) -> set[str]:
    """Names set under `vars:` of any group in an inventory file (below group_vars/all/)."""
    names = set((node or {}).get("vars") or {})
    for child in ((node or {}).get("children") or {}).values():
        names |= group_vars_in_file(child)
    return names


@pytest.mark.parametrize("inventory", sorted(p.name for p in INVENTORIES.iterdir()))
def test_an_inventory_does_not_set_what_would_be_ignored(inventory):
    shared = set(names_in(SHARED))
    outranked = set(names_in(INVENTORIES / inventory / "group_vars" / "all"))
    for source in (INVENTORIES / inventory).glob("*.yml"):
        outranked |= group_vars_in_file(yaml.safe_load(source.read_text())["all"])
    ignored = sorted(outranked & shared)
    assert not ignored, (
        f"inventories/{inventory} sets {ignored} in group_vars/all/ or an inventory file's group "
        "vars, which playbooks/group_vars/all/ outranks: set a site's value in "
        "group_vars/gpu_workers/ or app_servers/, or per host, instead"
    )


def test_the_timeouts_live_once():
    assert "comfyume_timeouts" in names_in(SHARED)
    assert not list(INVENTORIES.glob("*/group_vars/**/timeouts.yml"))
    for inventory in INVENTORIES.iterdir():
        assert "comfyume_timeouts" not in names_in(inventory / "group_vars")


def imported(playbook: Path) -> list[Path]:
    entries = yaml.safe_load(playbook.read_text())
    assert all("ansible.builtin.import_playbook" in entry for entry in entries), (
        f"{playbook.relative_to(REPO)} has a play of its own: it does not load playbooks/group_vars"
    )
    return [(playbook.parent / e["ansible.builtin.import_playbook"]).resolve() for e in entries]


@pytest.mark.parametrize(
    "entry",
    ["site.yml", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("molecule/*/converge.yml"))],
)
def test_every_way_in_runs_plays_of_playbooks(entry):
    """site.yml and the scenarios' converges import playbooks/*.yml (directly or through
    site.yml), so each play loads playbooks/group_vars/. The tailscale scenario applies its role
    with its own values."""
    if entry == "molecule/tailscale/converge.yml":
        pytest.skip("applies the tailscale role with molecule/tailscale/vars")
    pending, plays = [REPO / entry], []
    while pending:
        for target in imported(pending.pop()):
            (pending if target.name == "site.yml" else plays).append(target)
    assert plays
    assert all(p.parent == REPO / "playbooks" for p in plays), plays


@pytest.mark.parametrize(
    ("source", "host", "group"),
    [
        ("production/hosts.yml", "verda-h100", "gpu"),
        ("production/hosts.yml", "app-server", "app"),
        ("local/hosts.yml", "verda-sim", "gpu"),
        ("local/hosts.yml", "app-server", "app"),
        ("local/fleet.yml", "fleet-gpu-2", "gpu"),
        ("local/fleet.yml", "fleet-app", "app"),
    ],
)
def test_each_inventory_sees_the_shared_values(source, host, group):
    command = [str(BIN / "ansible-inventory"), "-i", str(INVENTORIES / source), "--host", host]
    proc = subprocess.run(
        [*command, "--playbook-dir", str(REPO / "playbooks")],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(proc.stdout)
    wanted = {
        "gpu": ["comfyume_timeouts", "worker_timeouts", "worker_redis_host", "project_dir"],
        "app": ["comfyume_timeouts", "appserver_nginx_timeouts", "appserver_exchange_token"],
    }[group]
    assert set(wanted) <= set(seen), sorted(set(wanted) - set(seen))
    # The site's own values still come from the inventory.
    assert "comfyume_redis_host" in seen and "comfyume_exchange_token" in seen
