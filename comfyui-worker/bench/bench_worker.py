"""Benchmark of the worker (not a test): overhead, throughput, duplicates, lost jobs, idle CPU.

  .venv/bin/python comfyui-worker/bench/bench_worker.py [--jobs 100] [--baseline-jobs 20]

Everything runs here, side by side in one run, on real processes: a password-protected
redis-server, ComfyUI stand-ins (one per worker, as one ComfyUI per GPU) and `worker.py`
processes. The baseline is a loop built like the platform's old worker: it polls the queue every
2 s and ComfyUI's history every second. Per-job overhead is submit -> `completed` event, minus
ComfyUI's own execution time from its history. Figures are ratios and medians of one run on a
shared machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
WORKER_DIR = HERE.parent
STANDIN = WORKER_DIR / "tests" / "comfyui_standin" / "main.py"
PY = sys.executable
sys.path.insert(0, str(WORKER_DIR))
from jobs import new_job_record  # noqa: E402  (the worker's module, found through WORKER_DIR)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def workflow(color: int = 0) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }


class Rig:
    """The processes of one benchmark run, all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.password = secrets.token_hex(12)
        self.redis_port = free_port()
        proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        conf = f'port {self.redis_port}\nbind 127.0.0.1\nrequirepass {self.password}\nsave ""\n'
        proc.stdin.write(conf.encode())  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        self.r = redis.Redis(port=self.redis_port, password=self.password)

        def up() -> bool:
            try:
                return bool(self.r.ping())
            except redis.RedisError:
                return False

        wait_until(up, 15, "redis-server")
        self.comfy: list[tuple[str, Path]] = []

    def start_comfy(self, count: int, real_source: Path | None = None) -> None:
        """Stand-ins, or one real ComfyUI (CPU) when `real_source` is a v0.11.0 checkout."""
        for _ in range(count):
            port = free_port()
            base = self.root / f"comfy{len(self.comfy)}"
            out = base / "outputs" / ".comfyui"
            out.mkdir(parents=True)
            args = ["--listen", "127.0.0.1", "--port", str(port), "--output-directory", str(out)]
            args += ["--input-directory", str(base / "in")]
            if real_source is not None:
                python = os.environ.get("COMFYUI_PYTHON") or str(real_source / ".venv/bin/python")
                cmd = [python, str(real_source / "main.py"), *args, "--cpu"]
                cmd += ["--base-directory", str(base), "--disable-auto-launch"]
                cwd, limit = real_source, 240
                (base / "custom_nodes").mkdir()  # ComfyUI lists it at start
            else:
                cmd, cwd, limit = [PY, str(STANDIN), *args], STANDIN.parent, 30
            log = open(base / "comfy.log", "wb")  # noqa: SIM115
            self.procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT))
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda u=url: _http_ok(u + "/system_stats"), limit, f"ComfyUI at {url}")
            self.comfy.append((url, base))

    def start_worker(self, index: int, name: str) -> subprocess.Popen:
        url, base = self.comfy[index]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "COMFYUI_"))},
            "REDIS_PORT": str(self.redis_port),
            "REDIS_PASSWORD": self.password,
            "WORKER_ID": name,
            "COMFYUI_URL": url,
            "OUTPUTS_DIR": str(base / "outputs"),
            "COMFYUI_OUTPUT_DIR": str(base / "outputs" / ".comfyui"),
            "OUTPUT_DELIVERY": "local",
            "INPUTS_DIR": str(base / "participants"),
            "COMFYUI_INPUT_DIR": str(base / "in"),
            "STAGING_DIR": str(self.root / f"{name}-staging"),
            "HEALTH_FILE": str(self.root / f"{name}.health"),
            "LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen(
            [PY, str(WORKER_DIR / "worker.py")],
            cwd=WORKER_DIR,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / f"{name}.log", "wb"),  # noqa: SIM115
        )
        self.procs.append(proc)

        def idle() -> bool:
            raw = self.r.get(f"worker:{name}:status")
            return bool(raw) and json.loads(raw).get("state") == "idle"

        wait_until(idle, 20, f"worker {name} to be idle")
        return proc

    def stop_worker(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def submit(self, wf: dict, publish: bool = True) -> tuple[str, float]:
        job_id = str(uuid.uuid4())
        now = datetime.now(timezone.utc)
        doc = new_job_record(job_id, "bench", wf, 2, now.isoformat())
        t0 = time.perf_counter()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(f"job:{job_id}", json.dumps(doc))
        pipe.zadd("queue:pending", {job_id: 2_000_000 + now.timestamp()})
        if publish:
            event = {"type": "job_created", "data": doc, "timestamp": now.isoformat()}
            pipe.publish("queue:updates", json.dumps(event))
        pipe.execute()
        return job_id, t0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def sequential_overheads(rig: Rig, count: int, jitter: float) -> list[float]:
    """Submit one job at a time and time it to its `completed` event; ms of overhead each."""
    pubsub = rig.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("queue:updates")
    overheads = []
    for i in range(count):
        time.sleep(jitter * ((i * 7919) % 100) / 100)  # spread submits over the poll phase
        job_id, t0 = rig.submit(workflow(i))
        deadline = time.monotonic() + 30
        while True:
            msg = pubsub.get_message(timeout=1)
            if msg is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: job {job_id} did not complete")
                continue
            event = json.loads(msg["data"])
            data = event.get("data") or {}
            if data.get("id") == job_id and data.get("status") in ("completed", "failed"):
                t1 = time.perf_counter()
                break
        if data["status"] != "completed":
            raise SystemExit(f"bench: job failed: {data.get('error')}")
        exec_ms = (data.get("result") or {}).get("execution_ms") or 0.0
        overheads.append((t1 - t0) * 1000 - exec_ms)
    pubsub.close()
    return overheads


class PollingWorker(threading.Thread):
    """The old design: ZPOPMIN every 2 s, then GET /history every 1 s until the prompt is done."""

    def __init__(
        self, rig: Rig, comfy_url: str, queue_poll: float = 2.0, history_poll: float = 1.0
    ):
        super().__init__(daemon=True)
        self.rig, self.url = rig, comfy_url
        self.queue_poll, self.history_poll = queue_poll, history_poll
        self.stop = threading.Event()

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    def run(self) -> None:
        r = self.rig.r
        while not self.stop.is_set():
            popped = r.zpopmin("queue:pending")
            if not popped:
                self.stop.wait(self.queue_poll)
                continue
            job_id = popped[0][0].decode()
            doc = json.loads(r.get(f"job:{job_id}"))
            prompt_id = str(uuid.uuid4())
            self._post("/prompt", {"prompt": doc["workflow"], "prompt_id": prompt_id})
            while True:
                self.stop.wait(self.history_poll)
                with urllib.request.urlopen(f"{self.url}/history/{prompt_id}") as resp:
                    entry = json.load(resp).get(prompt_id)
                if entry:
                    break
            messages = dict((m[0], m[1]) for m in entry["status"]["messages"])
            exec_ms = (
                messages["execution_success"]["timestamp"]
                - messages["execution_start"]["timestamp"]
            )
            doc.update(status="completed", result={"execution_ms": exec_ms})
            r.set(f"job:{job_id}", json.dumps(doc))
            r.zadd("queue:completed", {job_id: time.time()})
            event = {"type": "job_updated", "data": doc, "timestamp": "now"}
            r.publish("queue:updates", json.dumps(event))


def throughput(rig: Rig, workers: int, jobs: int) -> dict:
    """Queue `jobs` at once for `workers` workers; jobs/s, duplicates (claims > 1), lost."""
    rig.r.delete("queue:completed", "queue:failed")
    procs = [rig.start_worker(i, f"tp{workers}-{i}") for i in range(workers)]
    claims: Counter[str] = Counter()
    completed: set[str] = set()
    pubsub = rig.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("queue:updates")
    ids = set()
    t0 = time.perf_counter()
    pipe_ids = [rig.submit(workflow(i))[0] for i in range(jobs)]
    ids.update(pipe_ids)
    deadline = time.monotonic() + 120
    while len(completed) < jobs and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1)
        if not msg:
            continue
        data = json.loads(msg["data"]).get("data") or {}
        if data.get("id") not in ids:
            continue
        if data.get("status") == "running":
            claims[data["id"]] += 1
        elif data.get("status") == "completed":
            completed.add(data["id"])
    elapsed = time.perf_counter() - t0
    time.sleep(0.3)
    while msg := pubsub.get_message(timeout=0.1):
        data = json.loads(msg["data"]).get("data") or {}
        if data.get("status") == "running" and data.get("id") in ids:
            claims[data["id"]] += 1
    pubsub.close()
    for proc in procs:
        rig.stop_worker(proc)
    in_redis = sum(
        1 for i in ids if json.loads(rig.r.get(f"job:{i}") or b"{}").get("status") == "completed"
    )
    return {
        "workers": workers,
        "jobs": jobs,
        "seconds": elapsed,
        "jobs_per_s": len(completed) / elapsed,
        "duplicates": sum(c - 1 for c in claims.values() if c > 1),
        "lost": jobs - in_redis,
        "left_pending": rig.r.zcard("queue:pending"),
        "left_running": rig.r.zcard("queue:running"),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="sequential jobs for the worker")
    parser.add_argument("--baseline-jobs", type=int, default=25, help="jobs for the 2 s poller")
    parser.add_argument("--throughput-jobs", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--comfyui-source",
        type=Path,
        default=os.environ.get("COMFYUI_SOURCE") or None,
        help="a real ComfyUI v0.11.0 checkout (with .venv) for the overhead comparison "
        "(default: $COMFYUI_SOURCE; the stand-in otherwise)",
    )
    args = parser.parse_args()
    if not STANDIN.is_file():
        raise SystemExit(f"bench: the ComfyUI stand-in is missing: {STANDIN}")

    root = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    rig = Rig(root)
    kind = "ComfyUI stand-in"
    try:
        rig.start_comfy(4)
        overhead_comfy = 0
        kind = "ComfyUI stand-in"
        if args.comfyui_source:
            rig.start_comfy(1, args.comfyui_source)
            overhead_comfy, kind = 4, "real ComfyUI v0.11.0 (--cpu)"
        print(f"bench: redis-server, ComfyUI stand-ins, workers in {root}", flush=True)
        print(f"bench: overhead measured against the {kind}", flush=True)

        # 1. Overhead: this worker, then the polling design, on the same ComfyUI.
        worker = rig.start_worker(overhead_comfy, "overhead")
        sequential_overheads(rig, 10, 0)  # warm-up
        ours = sequential_overheads(rig, args.jobs, 0.01)
        # 4. Idle CPU of the same worker, with nothing queued.
        time.sleep(1)
        c0, t0 = cpu_seconds(worker.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(worker.pid) - c0) / (time.monotonic() - t0) * 100
        rig.stop_worker(worker)

        poller = PollingWorker(rig, rig.comfy[overhead_comfy][0])
        poller.start()
        # Submits spread uniformly over the 2 s poll period, as users' submits are.
        theirs = sequential_overheads(rig, args.baseline_jobs, 2.0)
        poller.stop.set()

        # 2 and 3. Throughput with 1, 2, 4 workers on one Redis; duplicates and lost jobs.
        runs = [throughput(rig, n, args.throughput_jobs) for n in (1, 2, 4)]
    finally:
        rig.close()
        shutil.rmtree(root, ignore_errors=True)

    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    p99_ours, p99_theirs = pct(ours, 0.99), pct(theirs, 0.99)
    print()
    print(f"per-job overhead (submit -> completed, minus ComfyUI's execution time), ms; {kind}")
    print(f"  {'':26}{'median':>10}{'p99':>10}{'max':>10}{'jobs':>7}")
    print(f"  {'this worker':26}{med_ours:10.1f}{p99_ours:10.1f}{max(ours):10.1f}{len(ours):7d}")
    print(
        f"  {'2 s polling (old design)':26}{med_theirs:10.1f}{p99_theirs:10.1f}"
        f"{max(theirs):10.1f}{len(theirs):7d}"
    )
    print(
        f"  ratio polling / worker:   median {med_theirs / med_ours:6.0f}x   "
        f"p99 {p99_theirs / p99_ours:6.0f}x"
    )
    print()
    print("throughput (one Redis; each worker with its own ComfyUI stand-in; 2 shared cores)")
    for run in runs:
        print(
            f"  {run['workers']} worker(s): {run['jobs_per_s']:7.1f} jobs/s "
            f"({run['jobs']} jobs in {run['seconds']:.2f} s)  duplicates {run['duplicates']}  "
            f"lost {run['lost']}  left pending/running {run['left_pending']}/"
            f"{run['left_running']}"
        )
    print()
    print(f"idle worker CPU: {idle_cpu:.3f} % of one core over {args.idle_seconds:g} s")
    print()
    dup = sum(r["duplicates"] for r in runs)
    lost = sum(r["lost"] for r in runs)
    goals = [
        ("median overhead <= 20 ms", med_ours <= 20),
        ("p99 overhead <= 100 ms", p99_ours <= 100),
        ("median 80x better than polling", med_theirs / med_ours >= 80),
        ("zero duplicates", dup == 0),
        ("zero lost jobs", lost == 0),
        ("idle CPU < 1 % of a core", idle_cpu < 1),
    ]
    for name, ok in goals:
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
