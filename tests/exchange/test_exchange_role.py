"""The appserver_exchange role refuses bad settings naming the variable, and keeps the token
out of every output: its validation tasks run here through ansible-playbook on localhost."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets

import pytest
import yaml
from exchange_helpers import ROLE, run_playbook

TOKEN = secrets.token_hex(24)
GOOD = {
    "appserver_exchange_token": TOKEN,
    "appserver_exchange_listen_address": "127.0.0.1",
    "appserver_exchange_user": pwd.getpwuid(os.getuid()).pw_name,
}

# case -> (overrides, words the failure message must hold; None: the checks pass)
VALIDATE_CASES = {
    "good": ({}, None),
    "empty token": ({"appserver_exchange_token": ""}, ["appserver_exchange_token", "vault"]),
    "placeholder token": (
        {"appserver_exchange_token": "CHANGE-ME"},
        ["appserver_exchange_token", "CHANGE-ME", "vault"],
    ),
    "short token": ({"appserver_exchange_token": "abc123"}, ["appserver_exchange_token", "16"]),
    "token that breaks nginx": (
        {"appserver_exchange_token": 'abcdefgh" 1; } ijklmnop'},
        ["appserver_exchange_token", "characters"],
    ),
    "empty address": (
        {"appserver_exchange_listen_address": ""},
        ["appserver_exchange_listen_address"],
    ),
    "any IPv4": (
        {"appserver_exchange_listen_address": "0.0.0.0"},
        ["appserver_exchange_listen_address"],
    ),
    "any IPv6": (
        {"appserver_exchange_listen_address": "::"},
        ["appserver_exchange_listen_address"],
    ),
    "any IPv6 long": (
        {"appserver_exchange_listen_address": "0:0:0:0:0:0:0:0"},
        ["appserver_exchange_listen_address"],
    ),
    "host name": (
        {"appserver_exchange_listen_address": "app-server"},
        ["appserver_exchange_listen_address", "tailnet"],
    ),
    "address not on this host": (
        {"appserver_exchange_listen_address": "192.0.2.77"},
        ["appserver_exchange_listen_address", "not an address of"],
    ),
    "missing account": (
        {"appserver_exchange_user": "no-such-account-here"},
        ["appserver_exchange_user", "does not exist"],
    ),
    "port": ({"appserver_exchange_port": 70000}, ["appserver_exchange_port"]),
    "body size": (
        {"appserver_exchange_max_body_size": "4 GB"},
        ["appserver_exchange_max_body_size"],
    ),
}

SPEC_CASES = {
    "spec: no token": ({"appserver_exchange_token": None}, ["appserver_exchange_token"]),
    "spec: no address": (
        {"appserver_exchange_listen_address": None},
        ["appserver_exchange_listen_address"],
    ),
    "spec: port not a number": ({"appserver_exchange_port": "eighty"}, ["appserver_exchange_port"]),
}


def case_block(name: str, task: dict, overrides: dict) -> dict:
    """A block that records `passed` or the failure message of `task` under `name`."""
    variables = {k: v for k, v in {**GOOD, **overrides}.items() if v is not None}
    record = "{{ exchange_results | default({}) | combine({%r: %s}) }}"
    return {
        "name": name,
        "vars": variables,
        "block": [
            task,
            {"ansible.builtin.set_fact": {"exchange_results": record % (name, "'passed'")}},
        ],
        "rescue": [
            {
                "ansible.builtin.set_fact": {
                    "exchange_results": record % (name, "ansible_failed_result.msg")
                }
            }
        ],
    }


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("role")
    results = workdir / "results.json"
    validate = {
        "ansible.builtin.include_role": {"name": "appserver_exchange", "tasks_from": "validate"}
    }
    spec = {
        "ansible.builtin.validate_argument_spec": {
            "argument_spec": "{{ (lookup('ansible.builtin.file', '"
            + str(ROLE / "meta" / "argument_specs.yml")
            + "') | from_yaml).argument_specs.main.options }}"
        }
    }
    tasks = [case_block(n, validate, o) for n, (o, _) in VALIDATE_CASES.items()]
    tasks += [case_block(n, spec, o) for n, (o, _) in SPEC_CASES.items()]
    tasks.append(
        {
            "name": "Write the results",
            "ansible.builtin.copy": {
                "content": "{{ exchange_results | to_json }}",
                "dest": str(results),
                "mode": "0600",
            },
        }
    )
    tasks.append(
        {
            "name": "Write the group the good case found",
            "ansible.builtin.copy": {
                "content": "{{ _appserver_exchange_group }}",
                "dest": str(workdir / "group"),
                "mode": "0600",
            },
        }
    )
    plays = [{"name": "Validate", "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    run = run_playbook(workdir, plays, {}, "-v", with_defaults=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(results.read_text()), run.stdout + run.stderr, workdir


@pytest.mark.parametrize("name", [*VALIDATE_CASES, *SPEC_CASES])
def test_bad_settings_are_refused_naming_the_variable(outcome, name):
    results, _, _ = outcome
    words = {**VALIDATE_CASES, **SPEC_CASES}[name][1]
    if words is None:
        assert results[name] == "passed"
    else:
        assert results[name] != "passed", f"{name} was accepted"
        for word in words:
            assert word in results[name], results[name]


def test_the_good_case_finds_the_accounts_group(outcome):
    _, _, workdir = outcome
    assert (workdir / "group").read_text() == grp.getgrgid(os.getgid()).gr_name


def test_the_token_never_reaches_ansible_output(outcome):
    results, output, _ = outcome
    assert TOKEN not in output
    assert TOKEN not in json.dumps(results)


TOKEN_VAR = re.compile(r"(?<!\w)appserver_exchange_token(?!\w)")


def walk_tasks(node):
    if isinstance(node, list):
        for item in node:
            yield from walk_tasks(item)
    elif isinstance(node, dict):
        if any(k in node for k in ("block", "rescue", "always")):
            for key in ("block", "rescue", "always"):
                yield from walk_tasks(node.get(key, []))
        else:
            yield node


def mentions_token(task: dict) -> bool:
    """Whether a task evaluates appserver_exchange_token, itself or through its template."""
    text = yaml.safe_dump(task)
    expressions = re.findall(r"\{\{.*?\}\}", text, re.S)
    for key in ("when", "that", "failed_when", "changed_when"):
        expressions.append(str(task.get(key, "")))
        for module in task.values():
            if isinstance(module, dict):
                expressions.append(str(module.get(key, "")))
    if any(TOKEN_VAR.search(e) for e in expressions):
        return True
    for module in task.values():
        src = str(module.get("src", "")) if isinstance(module, dict) else ""
        if src.endswith(".j2") and TOKEN_VAR.search((ROLE / "templates" / src).read_text()):
            return True
    return False


def test_every_task_that_handles_the_token_is_no_log():
    handled = []
    for path in sorted([*(ROLE / "tasks").glob("*.yml"), *(ROLE / "handlers").glob("*.yml")]):
        for task in walk_tasks(yaml.safe_load(path.read_text()) or []):
            if mentions_token(task):
                handled.append(task["name"])
                assert task.get("no_log") is True, f"{path.name}: {task['name']} must be no_log"
    assert len(handled) >= 2  # the check of the token and the rendering of token.conf


def test_only_token_conf_holds_the_token():
    holders = [p.name for p in (ROLE / "templates").iterdir() if TOKEN_VAR.search(p.read_text())]
    assert holders == ["token.conf.j2"]
    configure = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    (task,) = [
        t for t in configure if t.get("ansible.builtin.template", {}).get("src") == "token.conf.j2"
    ]
    assert task["ansible.builtin.template"]["mode"] == "0600"
    assert task["ansible.builtin.template"]["owner"] == "root"
    assert task.get("diff") is False
