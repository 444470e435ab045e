"""The workers' secrets, the Redis password and the file exchange's token, reach them only as
root-only files: no environment, image, log, rendered file or Ansible output (even at -vvv)
holds them, and the user ComfyUI runs as can read neither the files nor the worker's memory,
environment or file descriptors. The worker starts as root to read them, then runs as comfy,
non-dumpable, unable to become root again.

Each check reads real state: `docker inspect`, /proc of the containers' processes (read from
the GPU host, whose root may read any of them), the host's files and journal, and the output
of site.yml and verify.yml run again with -vvv."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import GPU_HOST, REPO, inspect, run_playbook

PROJECT = "/home/dev/comfyume"
SECRETS_DIR = f"{PROJECT}/secrets"
WORKERS = ("worker-1", "worker-2")
WORKER_PYTHON = "/opt/worker-venv/bin/python"
REPORT = REPO / ".artifacts" / "verify-report.json"


@pytest.fixture(scope="module")
def secrets(redis_password, sim_state_dir) -> dict[str, str]:
    """Each secret by the name of its file (on the host, and under /run/secrets/)."""
    token = (sim_state_dir / "exchange-token").read_text().split()[0]
    return {"redis-password": redis_password, "exchange-token": token}


def leaked(text: str, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets found in text (never the secrets: this goes into messages)."""
    return [name for name, value in secrets.items() if value in text]


def on_gpu_host(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """A command on the simulated GPU host with text on its stdin: a secret given to a check
    travels there, never on a command line."""
    return subprocess.run(
        ["docker", "exec", "-i", GPU_HOST, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def processes(gpu_host, name: str) -> list[tuple[int, int, str]]:
    """(pid on the GPU host, uid, command line) of every process of a worker container."""
    lines = gpu_host.check_output(f"docker top {name} -eo pid,uid,args").splitlines()[1:]
    return [(int(pid), int(uid), args) for pid, uid, args in (ln.split(None, 2) for ln in lines)]


def the_process(gpu_host, name: str, marker: str) -> tuple[int, int, str]:
    """The one process whose command line holds marker (tini's names the worker's too)."""
    [found] = [p for p in processes(gpu_host, name) if marker in p[2] and not is_tini(p[2])]
    return found


def is_tini(args: str) -> bool:
    return args.split()[0].endswith("tini")


# ---------------------------------------------------------------- what the play left


def test_no_container_configuration_holds_a_secret(gpu_host, secrets):
    for name in WORKERS:
        info = inspect(gpu_host, name)
        assert leaked(json.dumps(info), secrets) == [], name
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
        assert env["FILE_EXCHANGE_TOKEN_FILE"] == "/run/secrets/exchange-token"
        assert not {"REDIS_PASSWORD", "FILE_EXCHANGE_TOKEN"} & set(env), name


def test_secrets_are_root_only_files_mounted_read_only(gpu_host, secrets):
    folder = gpu_host.file(SECRETS_DIR)
    assert (folder.user, folder.group, folder.mode) == ("root", "root", 0o700)
    for secret, value in secrets.items():
        path = f"{SECRETS_DIR}/{secret}"
        host_file = gpu_host.file(path)
        assert (host_file.user, host_file.group, host_file.mode) == ("root", "root", 0o400)
        assert host_file.content_string.strip() == value, secret
        for name in WORKERS:
            [mount] = [
                m
                for m in inspect(gpu_host, name)["Mounts"]
                if m["Destination"] == f"/run/secrets/{secret}"
            ]
            assert (mount["Source"], mount["RW"]) == (path, False), mount
    # Where an earlier version kept the token, readable by the project's user.
    assert not gpu_host.file(f"{PROJECT}/.exchange-token").exists


def test_workers_drop_every_capability_but_those_the_drop_and_tini_need(gpu_host):
    """SETUID and SETGID for the worker's drop from root; KILL for tini (root, PID 1) to pass
    `docker stop`'s SIGTERM on to the worker once it is comfy."""
    for name in WORKERS:
        host_config = inspect(gpu_host, name)["HostConfig"]
        assert [c.upper().removeprefix("CAP_") for c in host_config["CapDrop"]] == ["ALL"]
        assert {c.upper().removeprefix("CAP_") for c in host_config["CapAdd"]} == {
            "SETUID",
            "SETGID",
            "KILL",
        }
        assert "no-new-privileges:true" in host_config["SecurityOpt"]


def test_the_worker_and_comfyui_run_as_comfy_and_cannot_become_root_again(gpu_host):
    comfy = int(gpu_host.check_output("docker exec worker-1 id -u comfy"))
    assert comfy != 0
    for name in WORKERS:
        by_role = {
            "worker": the_process(gpu_host, name, "/app/worker.py"),
            "comfyui": the_process(gpu_host, name, "main.py --listen"),
        }
        for role, (pid, uid, _) in by_role.items():
            assert uid == comfy, (name, role)
            status = dict(
                line.split(":", 1)
                for line in gpu_host.check_output(f"cat /proc/{pid}/status").splitlines()
            )
            assert status["Uid"].split() == [str(comfy)] * 4, (name, role, status["Uid"])
            assert "0" not in status["Gid"].split(), (name, role, status["Gid"])
            for caps in ("CapPrm", "CapEff", "CapAmb"):
                assert int(status[caps], 16) == 0, (name, role, caps, status[caps])
            assert status["NoNewPrivs"].strip() == "1", (name, role)
        # tini alone stays root, as PID 1 of the container (and a health check, which
        # `docker exec` runs as root, when one happens to run now).
        rooted = [args for _, uid, args in processes(gpu_host, name) if uid == 0]
        assert all(is_tini(args) or "/app/healthcheck.py" in args for args in rooted), rooted


def test_no_process_of_a_worker_holds_a_secret_in_its_environment(gpu_host, secrets):
    for name in WORKERS:
        worker_pid = the_process(gpu_host, name, "/app/worker.py")[0]
        for pid, _, args in processes(gpu_host, name):
            # Read as the GPU host's root, whom nothing refuses; a process that has just
            # ended (a health check) has nothing left to read.
            read = gpu_host.run(f"tr '\\0' '\\n' < /proc/{pid}/environ")
            if read.rc != 0 and not gpu_host.file(f"/proc/{pid}").exists:
                continue
            assert read.rc == 0, (name, args, read.stderr)
            assert leaked(read.stdout, secrets) == [], (name, args)
            names = {line.split("=", 1)[0] for line in read.stdout.splitlines()}
            assert not {"REDIS_PASSWORD", "FILE_EXCHANGE_TOKEN"} & names, (name, args)
            if pid == worker_pid:
                assert "REDIS_PASSWORD_FILE" in names  # the worker's own, really read


def test_comfyuis_user_cannot_read_the_secret_files(gpu_host, secrets):
    for secret in secrets:
        read = gpu_host.run(f"docker exec --user comfy worker-1 cat /run/secrets/{secret}")
        assert read.rc != 0, secret
        assert "Permission denied" in read.stderr, (secret, read.stderr)


# Run as comfy inside worker-1: what ComfyUI could do to reach the worker's secrets. ComfyUI's own
# process is the control: the same reads of a process of the same user succeed there.
REACH_THE_WORKER = r"""
import ctypes, json, os

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""

pids = [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]  # tini names it too
[worker] = [p for p in pids if "/app/worker.py" in cmdline(p)]
[comfyui] = [p for p in pids if "main.py --listen" in cmdline(p)]

def attempt(action):
    try:
        action()
        return "allowed"
    except PermissionError:
        return "denied"

def environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return fh.read()

def mem(pid):
    open(f"/proc/{pid}/mem", "rb").close()  # the kernel decides at open

libc = ctypes.CDLL(None, use_errno=True)
def ptrace(pid):
    if libc.ptrace(16, int(pid), 0, 0) != 0:  # PTRACE_ATTACH
        raise PermissionError(ctypes.get_errno(), "ptrace")
    os.waitpid(int(pid), 0)
    libc.ptrace(17, int(pid), 0, 0)  # PTRACE_DETACH

def fds(pid):
    os.listdir(f"/proc/{pid}/fd")

print(json.dumps({
    "uid": os.getuid(),
    "worker": {name: attempt(lambda f=f: f(worker)) for name, f in
               [("environ", environ), ("mem", mem), ("fd", fds), ("ptrace", ptrace)]},
    "comfyui": {"environ": attempt(lambda: environ(comfyui)), "fd": attempt(lambda: fds(comfyui))},
    "comfyui_environ": environ(comfyui).decode(errors="replace"),
}))
"""


def test_comfyuis_user_cannot_reach_the_workers_memory_environment_or_files(secrets):
    run = on_gpu_host(
        "docker", "exec", "-i", "--user", "comfy", "worker-1", WORKER_PYTHON, "-",
        stdin=REACH_THE_WORKER,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["uid"] != 0
    assert found["worker"] == {
        "environ": "denied",
        "mem": "denied",
        "fd": "denied",
        "ptrace": "denied",
    }
    # The control: a process of the same user that is dumpable is readable.
    assert found["comfyui"] == {"environ": "allowed", "fd": "allowed"}
    assert leaked(found["comfyui_environ"], secrets) == []


def test_what_the_worker_writes_belongs_to_comfy(gpu_host):
    """Written after the drop: the health file and ComfyUI's pid file (read by the root health
    check, which writes nothing), and the worker's folders in its staging folder (which only
    comfy may enter: docker exec's root holds no capability)."""
    owners = gpu_host.check_output(
        "docker exec --user comfy worker-1 sh -c 'stat -c %U /tmp/comfyui-worker.health "
        "/tmp/comfyui-worker.health.comfyui-*.pid /staging/comfyui-output'"
    ).split()
    assert owners == ["comfy"] * 3, owners


# ------------------------------------------- the play and verify.yml again, at -vvv


@pytest.fixture(scope="module")
def verbose_runs(gpu_host, secrets):
    """site.yml and verify.yml at -vvv (site.yml with --diff), on a host whose .env holds the
    password as an earlier version of the role wrote it."""
    added = on_gpu_host(
        "sh", "-c", f"cat >> {PROJECT}/.env", stdin=f"REDIS_PASSWORD={secrets['redis-password']}\n"
    )
    assert added.returncode == 0, added.stderr
    site = run_playbook(REPO / "site.yml", "-vvv", "--diff", timeout=1800)
    verify = run_playbook(
        REPO / "playbooks/verify.yml", "-vvv", "-e", f"verify_report_path={REPORT}"
    )
    return site, verify


def test_site_and_verify_show_no_secret_even_at_vvv(verbose_runs, secrets):
    site, verify = verbose_runs
    assert site.rc == 0, site.output[-3000:]
    assert verify.rc == 0, verify.output[-3000:]
    # Really that verbose, and the secrets' tasks ran ...
    for run in (site, verify):
        assert "module_args" in run.output
    assert "TASK [worker : Write the Redis password for the workers]" in site.output
    assert "TASK [worker : Write the file exchange's token for the workers]" in site.output
    # ... and neither secret was printed.
    assert leaked(site.output, secrets) == []
    assert leaked(verify.output, secrets) == []


def test_a_password_an_earlier_version_wrote_into_the_env_is_gone(verbose_runs, gpu_host, secrets):
    env = gpu_host.file(f"{PROJECT}/.env").content_string
    assert leaked(env, secrets) == []
    lines = env.splitlines()
    assert "REDIS_PASSWORD_FILE=/run/secrets/redis-password" in lines
    assert not [line for line in lines if line.startswith("REDIS_PASSWORD=")]


def test_no_image_log_journal_or_file_of_the_host_holds_a_secret(verbose_runs, gpu_host, secrets):
    image = inspect(gpu_host, "worker-1")["Config"]["Image"]
    places = {
        "docker inspect": f"docker inspect {' '.join(WORKERS)}",
        "docker history": f"docker history --no-trunc {image}",
        "docker image inspect": f"docker image inspect {image}",
        "docker logs": "docker logs worker-1 2>&1; docker logs worker-2 2>&1",
        # Every field of every entry, the logging process's command line included.
        "journal": "journalctl --no-pager -q -o verbose",
    }
    for place, command in places.items():
        assert leaked(gpu_host.check_output(command), secrets) == [], place
    # No file of the project holds one, but the secrets' own.
    for secret, value in secrets.items():
        found = on_gpu_host(
            "grep", "-rlF", "--exclude-dir=secrets", "--exclude-dir=ComfyUI", "-f", "/dev/stdin",
            PROJECT, stdin=value + "\n",
        )  # fmt: skip
        assert found.returncode == 1, (secret, found.stdout, found.stderr)
