"""The tailscale role against the tailscale test double, asserting the host's real state.

The first tests read what converge left. The later ones re-run the role through
ansible-playbook (the scenario's own inventory and converge playbook) to prove that the
auth key never shows in Ansible's output, that check mode only reports `tailscale up`,
that tailscale_state=absent leaves the tailnet, and that bad input fails clearly. They run
in file order; the last one joins again, so verify can be repeated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

SCENARIO = Path(__file__).resolve().parent.parent
CONVERGE = SCENARIO / "converge.yml"
VARS = yaml.safe_load((SCENARIO / "vars" / "test-values.yml").read_text(encoding="utf-8"))
KEY = VARS["tailscale_authkey"]
HOSTNAME = VARS["tailscale_hostname"]
TAGS = sorted(t if t.startswith("tag:") else f"tag:{t}" for t in VARS["tailscale_tags"])
LOG_DIR = "/var/log/tailscale-double"
STATE_FILE = "/var/lib/tailscale/tailscaled.state-double.json"


def run_role(*extra: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the scenario's converge playbook with extra arguments; return it and its changes."""
    env = dict(os.environ)
    env.setdefault("ANSIBLE_ROLES_PATH", str(SCENARIO.parents[1] / "roles"))
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    proc = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(CONVERGE),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    recap = re.search(r"ts-sim\s+:\s+ok=\d+\s+changed=(\d+)", proc.stdout)
    return proc, int(recap.group(1)) if recap else -1


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def status(host) -> dict:
    return json.loads(host.check_output("tailscale status --json"))


def calls(host) -> list[list[str]]:
    lines = host.file(f"{LOG_DIR}/calls.log").content_string.splitlines()
    return [json.loads(line)["argv"] for line in lines]


def up_calls(host) -> list[list[str]]:
    return [argv for argv in calls(host) if argv[1:2] == ["up"]]


def assert_key_nowhere_on_host(host) -> None:
    """The key is in no recorded argv, no `ps` taken during `up` or now, no journal, no file."""
    for log in ("calls.log", "ps-during-up.log"):
        content = host.file(f"{LOG_DIR}/{log}").content_string
        assert content, log
        assert KEY not in content, log
    assert KEY not in host.check_output("ps -eww -o args=")
    assert KEY not in host.check_output("journalctl --no-pager -q -o cat || true")
    assert host.check_output("find /run /tmp /root -name '*tailscale-authkey*'") == ""


# --------------------------------------------------------------- what converge left


def test_package_installed_from_the_local_repository(host):
    package = host.package("tailscale")
    assert package.is_installed
    assert package.version.endswith("~double")
    assert "file:/srv/local-apt" in host.check_output("apt-cache policy tailscale")


def test_tailscaled_running_and_enabled(host):
    service = host.service("tailscaled")
    assert service.is_running
    assert service.is_enabled


def test_node_is_running_with_hostname_and_tags(host):
    st = status(host)
    assert st["BackendState"] == "Running"
    assert st["Self"]["Online"] is True
    assert st["Self"]["HostName"] == HOSTNAME
    assert sorted(st["Self"]["Tags"]) == TAGS


def test_ipv4_fact_equals_tailscale_ip(host):
    fact = host.file("/var/lib/tailscale-molecule-ipv4").content_string.strip()
    assert fact == host.check_output("tailscale ip -4").strip()
    assert fact == status(host)["Self"]["TailscaleIPs"][0]
    assert fact in host.check_output("ip -4 -o addr show dev eth0")


def test_key_reached_tailscale_only_through_a_file(host):
    state = json.loads(host.file(STATE_FILE).content_string)
    assert state["AuthKeySHA256"] == hashlib.sha256(KEY.encode()).hexdigest()
    logins = [argv for argv in up_calls(host) if any(a.startswith("--auth-key") for a in argv)]
    assert logins
    for argv in logins:
        assert argv[2] == "--auth-key=file:/run/tailscale-authkey", argv
        assert argv[-1] == "--accept-dns=false"  # tailscale_up_extra_args, last
    # The snapshot was taken while the `up` call (and the Ansible task around it) ran.
    snapshots = host.file(f"{LOG_DIR}/ps-during-up.log").content_string
    assert "tailscale up --auth-key=file:" in snapshots
    assert_key_nowhere_on_host(host)


# --------------------------------------------------- the role again, through ansible-playbook


def test_check_mode_reports_up_without_running_it(host):
    host.check_output("tailscale logout")
    ups_before = len(up_calls(host))
    proc, changed = run_role("--check", "--diff")
    assert proc.returncode == 0, output_of(proc)
    assert "tailscale up would run (BackendState NeedsLogin)" in proc.stdout
    assert changed >= 1
    assert status(host)["BackendState"] == "NeedsLogin"
    assert len(up_calls(host)) == ups_before
    assert KEY not in output_of(proc)


def test_rejoin_never_shows_the_key_even_at_vvv(host):
    proc, changed = run_role("-vvv", "--diff")
    out = output_of(proc)
    assert proc.returncode == 0, out
    assert changed >= 1
    assert "--auth-key=file:/run/tailscale-authkey" in out  # the file was used ...
    assert KEY not in out  # ... and its content never printed
    assert status(host)["BackendState"] == "Running"
    assert_key_nowhere_on_host(host)


def test_changed_tags_rerun_up_without_the_key(host):
    proc, changed = run_role("-e", json.dumps({"tailscale_tags": ["comfyume-gpu"]}))
    assert proc.returncode == 0, output_of(proc)
    assert changed == 1, proc.stdout
    last_up = up_calls(host)[-1]
    assert not any(arg.startswith("--auth-key") for arg in last_up), last_up
    assert "--advertise-tags=tag:comfyume-gpu" in last_up
    assert status(host)["Self"]["Tags"] == ["tag:comfyume-gpu"]
    assert "tailscale-authkey" not in proc.stdout  # no key file when none is needed


def test_state_absent_leaves_the_tailnet_and_stops_tailscaled(host):
    proc, changed = run_role("-e", "tailscale_state=absent")
    assert proc.returncode == 0, output_of(proc)
    assert changed >= 1
    assert ["tailscale", "logout"] in calls(host)
    service = host.service("tailscaled")
    assert not service.is_running
    assert not service.is_enabled
    assert host.package("tailscale").is_installed
    state = json.loads(host.file(STATE_FILE).content_string)
    assert state["LoggedIn"] is False
    # The daemon is stopped, so the CLI fails like the real one; ask it after a start.
    cmd = host.run("tailscale status --json")
    assert cmd.rc != 0
    assert "failed to connect to local tailscaled" in cmd.stderr
    host.check_output("systemctl start tailscaled")
    try:
        assert status(host)["BackendState"] == "NeedsLogin"
    finally:
        host.check_output("systemctl stop tailscaled")


def test_state_absent_is_idempotent(host):
    proc, changed = run_role("-e", "tailscale_state=absent")
    assert proc.returncode == 0, output_of(proc)
    assert changed == 0, proc.stdout


def test_logged_out_node_without_key_fails_naming_the_variable(host):
    proc, _ = run_role("-vvv", "-e", json.dumps({"tailscale_authkey": ""}))
    out = output_of(proc)
    assert proc.returncode != 0
    assert "Require an auth key when the node is not logged in" in out
    assert "tailscale_authkey is empty" in out
    assert "BackendState NeedsLogin" in out
    assert status(host)["BackendState"] == "NeedsLogin"
    assert host.check_output("find /run -name '*tailscale-authkey*'") == ""


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"tailscale_state": "maybe"}, "tailscale_state"),
        ({"tailscale_tags": {"not": "a list"}}, "tailscale_tags"),
    ],
)
def test_bad_input_fails_at_role_entry(host, override, name):
    ups_before = len(up_calls(host))
    proc, _ = run_role("-vvv", "-e", json.dumps(override))
    out = output_of(proc)
    assert proc.returncode != 0
    assert "Validation of arguments failed" in out
    assert name in out
    assert KEY not in out  # the arg spec's no_log holds even in a failure dump
    assert len(up_calls(host)) == ups_before


def test_role_joins_again_after_leaving(host):
    proc, changed = run_role()
    assert proc.returncode == 0, output_of(proc)
    assert changed >= 1
    assert host.service("tailscaled").is_enabled
    st = status(host)
    assert st["BackendState"] == "Running"
    assert st["Self"]["HostName"] == HOSTNAME
    assert KEY not in output_of(proc)
    assert_key_nowhere_on_host(host)


def test_a_key_file_left_by_a_killed_run_is_removed_by_the_next_run(host):
    """A run killed while `tailscale up` waits never reaches its `always:` section: the key
    file stays. The next run removes it first, and the randomly named files of the role's
    earlier versions too, although this node needs no `up` at all."""
    leftovers = ["/run/tailscale-authkey", "/run/tailscale-authkey.k1lL3d"]
    for path in leftovers:
        host.check_output(f"umask 077 && printf %s {shlex.quote(KEY)} > {path}")
    proc, changed = run_role()
    assert proc.returncode == 0, output_of(proc)
    assert changed == 1, proc.stdout  # the removal, nothing else
    assert KEY not in output_of(proc)
    for path in leftovers:
        assert not host.file(path).exists, path
    assert_key_nowhere_on_host(host)


def test_uninstall_then_install_from_a_signed_mirror(host):
    """The repository path: tailscale_add_repo with its URL pointed at a signed mirror."""
    proc, changed = run_role(
        "-e",
        json.dumps(
            {"tailscale_state": "absent", "tailscale_uninstall": True, "tailscale_add_repo": False}
        ),
    )
    assert proc.returncode == 0, output_of(proc)
    assert changed >= 1
    assert not host.package("tailscale").is_installed
    assert calls(host)[-1] == ["tailscale", "logout"]

    distribution = host.system_info.distribution.lower()
    codename = host.system_info.codename
    url = f"file:///srv/tailscale-mirror/{distribution}"
    mirror = {"tailscale_add_repo": True, "tailscale_repo_url": url}
    host.check_output("rm -f /etc/apt/sources.list.d/local-apt.list")
    try:
        proc, changed = run_role("-e", json.dumps(mirror))
        assert proc.returncode == 0, output_of(proc)
        assert changed >= 1
        sources = host.file("/etc/apt/sources.list.d/tailscale.list").content_string
        keyring = "/usr/share/keyrings/tailscale-archive-keyring.gpg"
        assert f"deb [signed-by={keyring}] {url} {codename} main" in sources
        assert host.file(keyring).mode == 0o644
        assert f"{url.removeprefix('file://')} {codename}/main" in host.check_output(
            "apt-cache policy tailscale"
        )
        assert host.package("tailscale").is_installed
        assert status(host)["BackendState"] == "Running"

        proc, changed = run_role("-e", json.dumps(mirror))
        assert proc.returncode == 0, output_of(proc)
        assert changed == 0, proc.stdout
    finally:
        local = "deb [trusted=yes] file:/srv/local-apt ./"
        host.check_output(
            f"echo '{local}' > /etc/apt/sources.list.d/local-apt.list && apt-get update -qq"
        )
