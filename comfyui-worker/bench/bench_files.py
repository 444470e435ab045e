"""Benchmark of output delivery (not a test): what the app server's exchange costs a job.

  .venv/bin/python comfyui-worker/bench/bench_files.py [--jobs 40] [--large-mb 50] [--rounds 5]

Side by side in one run, on real processes: a password-protected redis-server, two ComfyUI
stand-ins, the exchange as the role renders it (real nginx on loopback), and two `worker.py`
processes, one with OUTPUT_DELIVERY=local and one with OUTPUT_DELIVERY=exchange (each on its own
Redis database). Small jobs alternate between the two; the per-job time is submit -> `completed`
event. For a large output, the delivery stage (PUT, read back, sha256 compared) is timed against
a plain `curl -T` PUT of the same file to the same exchange, alternating. Medians of one run on
a shared machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
WORKER_DIR = HERE.parent
REPO = WORKER_DIR.parent
sys.path.insert(0, str(WORKER_DIR))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "exchange"))
import exchange_helpers  # noqa: E402
from bench_worker import PY, Rig  # noqa: E402
from delivery import ExchangeDelivery  # noqa: E402
from exchange import ExchangeClient  # noqa: E402
from jobs import new_job_record  # noqa: E402


def small_image(side: int) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0x336699},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s"}},
    }


def submit_and_wait(client: redis.Redis, pubsub, workflow: dict) -> tuple[float, dict]:
    job_id = str(uuid.uuid4())
    created = datetime.now(timezone.utc)
    doc = new_job_record(job_id, "bench", workflow, 2, created.isoformat())
    started = time.perf_counter()
    client.set(f"job:{job_id}", json.dumps(doc))
    client.zadd("queue:pending", {job_id: 2_000_000 + created.timestamp()})
    client.publish("queue:updates", json.dumps({"type": "job_created", "data": doc}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if not message or message["type"] != "message":
            continue
        event = json.loads(message["data"])
        data = event.get("data") or {}
        if data.get("id") == job_id and data.get("status") in ("completed", "failed"):
            elapsed = time.perf_counter() - started
            if data["status"] != "completed":
                raise SystemExit(f"bench: job failed: {data.get('error')}")
            return elapsed, data
    raise SystemExit(f"bench: job {job_id} did not finish")


def worker_env(rig: Rig, index: int, db: int, extra: dict[str, str]) -> dict[str, str]:
    url, base = rig.comfy[index]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "COMFYUI_"))}
    env.update(
        REDIS_PORT=str(rig.redis_port),
        REDIS_PASSWORD=rig.password,
        REDIS_DB=str(db),
        WORKER_ID=f"bench-{db}",
        COMFYUI_URL=url,
        OUTPUTS_DIR=str(base / "outputs"),
        COMFYUI_OUTPUT_DIR=str(base / "outputs" / ".comfyui"),
        COMFYUI_INPUT_DIR=str(base / "in"),
        STAGING_DIR=str(base / "staging"),
        HEALTH_FILE=str(rig.root / f"w{db}.health"),
        LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def small_jobs(rig: Rig, server, token_file: Path, jobs: int, side: int) -> None:
    modes = {
        "local": worker_env(rig, 0, 0, {"OUTPUT_DELIVERY": "local"}),
        "exchange": worker_env(
            rig,
            1,
            1,
            {
                "OUTPUT_DELIVERY": "exchange",
                "FILE_EXCHANGE_URL": f"http://{server.address}:{server.port}",
                "FILE_EXCHANGE_TOKEN_FILE": str(token_file),
            },
        ),
    }
    clients, subs = {}, {}
    for db, (mode, env) in enumerate(modes.items()):
        proc = subprocess.Popen(
            [PY, str(WORKER_DIR / "worker.py")],
            cwd=WORKER_DIR,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(rig.root / f"{mode}.log", "wb"),  # noqa: SIM115
        )
        rig.procs.append(proc)
        clients[mode] = redis.Redis(port=rig.redis_port, password=rig.password, db=db)
        subs[mode] = clients[mode].pubsub(ignore_subscribe_messages=True)
        subs[mode].subscribe("queue:updates")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    sizes: dict[str, int] = {}
    for i in range(jobs + 3):
        for mode in modes if i % 2 == 0 else reversed(modes):
            elapsed, doc = submit_and_wait(clients[mode], subs[mode], small_image(side))
            if i >= 3:  # the first jobs warm up connections and ComfyUI's caches
                times[mode].append(elapsed * 1000)
            sizes[mode] = doc["result"]["outputs"][0]["size"]
    local, exchange = statistics.median(times["local"]), statistics.median(times["exchange"])
    print(f"small image ({sizes['exchange']} bytes PNG), {jobs} jobs each, alternating:")
    print(f"  OUTPUT_DELIVERY=local     median submit -> completed {local:7.1f} ms")
    print(f"  OUTPUT_DELIVERY=exchange  median submit -> completed {exchange:7.1f} ms")
    goal = "met" if exchange - local <= 20 else "NOT met"
    print(f"  delivery adds {exchange - local:+.1f} ms to the median (goal <= 20 ms: {goal})")


def large_file(server, token: str, token_file: Path, root: Path, mb: int, rounds: int) -> None:
    folder = root / "large" / "outputs" / "bench" / "job"
    folder.mkdir(parents=True)
    source = folder / "big.bin"
    with open(source, "wb") as fh:
        fh.write(os.urandom(mb << 20))
    url = f"http://{server.address}:{server.port}"
    header_file = root / "auth-header"
    header_file.write_text(f"Authorization: Bearer {token}\n")
    header_file.chmod(0o600)

    def curl_put() -> float:
        started = time.perf_counter()
        subprocess.run(
            [
                *("curl", "-sS", "-f", "-o", "/dev/null", "-H", f"@{header_file}"),
                *("-T", str(source), f"{url}/outputs/bench/curl/big.bin"),
            ],
            check=True,
        )
        return time.perf_counter() - started

    async def deliver(verify: bool) -> float:
        client = ExchangeClient(url, token, 60)
        await client.start()
        try:
            delivery = ExchangeDelivery(client, str(root / "large"), 60, 1, True, verify)
            files = [{"path": str(source), "size": source.stat().st_size}]
            started = time.perf_counter()
            await delivery.deliver("bench", "job", str(folder), files)
            return time.perf_counter() - started
        finally:
            await client.close()

    results: dict[str, list[float]] = {"curl": [], "checksum": [], "size": []}
    for _ in range(rounds):
        results["curl"].append(curl_put())
        results["checksum"].append(asyncio.run(deliver(True)))
        results["size"].append(asyncio.run(deliver(False)))
    curl = statistics.median(results["curl"])
    print(f"large output ({mb} MiB of random bytes), {rounds} rounds each, alternating:")
    print(f"  curl -T PUT                         {curl:6.3f} s  {mb / curl:7.1f} MiB/s")
    for mode, label in (("checksum", "read back + sha256"), ("size", "HEAD size only")):
        t = statistics.median(results[mode])
        ratio = curl / t
        goal = "met" if ratio >= 0.8 else "NOT met"
        print(
            f"  delivery, OUTPUT_VERIFY={mode:<8} {t:6.3f} s  {mb / t:7.1f} MiB/s  "
            f"{ratio:4.0%} of curl ({label}; goal >= 80%: {goal})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--side", type=int, default=600, help="EmptyImage side (PNG ~ 2 KB)")
    parser.add_argument("--large-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not exchange_helpers.NGINX or not shutil.which("curl"):
        raise SystemExit("bench: needs nginx and curl (apt-get install nginx curl)")
    root = Path(tempfile.mkdtemp(prefix="comfyume-bench-files-"))
    rig = Rig(root)
    token = secrets.token_urlsafe(24)
    server = exchange_helpers.start(
        exchange_helpers.prepare(root / "ex", "127.0.0.1", token, 1 << 30)
    )
    token_file = root / "token"
    token_file.write_text(token + "\n")
    try:
        rig.start_comfy(2)
        small_jobs(rig, server, token_file, args.jobs, args.side)
        large_file(server, token, token_file, root, args.large_mb, args.rounds)
    finally:
        exchange_helpers.stop(server)
        rig.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
