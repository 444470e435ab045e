#!/usr/bin/env python3
"""Queue a ComfyUI workflow on the platform's Redis, as the queue-manager does, and wait
for a worker to finish it.

Used by `make run` (the sample job through the simulated stack) and by the molecule
verify step. The password is read from a file or the REDIS_PASSWORD variable, never
taken on the command line.

    submit_job.py --host 172.18.0.3 --password-file /var/lib/comfyume-sim/redis-password \
        data/workflows/empty-image.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

# The contract's job record has one definition, in the worker's jobs.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comfyui-worker"))
from jobs import new_job_record


def enqueue(client: redis.Redis, workflow: dict[str, Any], user_id: str, priority: int = 2) -> str:
    """Store the job, queue it by the contract's score, and announce it (CONTRACTS §1)."""
    job_id = str(uuid.uuid4())
    created = datetime.now(timezone.utc)
    doc = new_job_record(job_id, user_id, workflow, priority, created.isoformat())
    pipe = client.pipeline()
    pipe.set(f"job:{job_id}", json.dumps(doc))
    pipe.zadd("queue:pending", {job_id: priority * 1_000_000 + created.timestamp()})
    pipe.sadd(f"user:{user_id}:jobs", job_id)
    pipe.publish(
        "queue:updates",
        json.dumps({"type": "job_created", "data": doc, "timestamp": created.isoformat()}),
    )
    pipe.execute()
    return job_id


def wait(client: redis.Redis, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it is completed, failed or cancelled, or the timeout passes."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        raw = client.get(f"job:{job_id}")
        doc = json.loads(raw) if raw else {}
        if doc.get("status") in ("completed", "failed", "cancelled"):
            return doc
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {doc.get('status', 'missing')} after {timeout:.0f} s")


def read_password(path: str | None) -> str:
    if path:
        return Path(path).read_text().split()[0]
    password = os.environ.get("REDIS_PASSWORD", "")
    if not password:
        sys.exit("submit_job: give --password-file or set REDIS_PASSWORD")
    return password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path, help="ComfyUI workflow in API format (JSON)")
    parser.add_argument("--host", required=True, help="address of the app server's Redis")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--password-file", help="file whose first word is the password")
    parser.add_argument("--user", default="demo", help="user_id of the job")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    parser.add_argument(
        "--outputs-root",
        help="the outputs folder participants see (the app server's): print a summary, "
        "not the job JSON",
    )
    args = parser.parse_args(argv)

    client = redis.Redis(args.host, args.port, password=read_password(args.password_file))
    job_id = enqueue(client, json.loads(args.workflow.read_text()), args.user)
    print(f"queued job {job_id} for user {args.user}", file=sys.stderr)
    doc = wait(client, job_id, args.timeout)
    if args.outputs_root:
        print(summary(doc, args.outputs_root))
    else:
        print(json.dumps(doc, indent=2, default=str))
    return 0 if doc.get("status") == "completed" else 1


def summary(doc: dict[str, Any], outputs_root: str) -> str:
    """A person's view of a finished job: status, timings, result, output paths."""
    result = doc.get("result") or {}
    lines = [
        f"job {doc['id']}: {doc['status']} on {doc.get('worker_id')}"
        f" (ComfyUI {result.get('execution_ms')} ms, worker {result.get('duration_ms')} ms)",
    ]
    if doc.get("error"):
        lines.append(f"error: {doc['error']}")
    lines.append("result: " + json.dumps(result, indent=2))
    for out in result.get("outputs", []):
        lines.append(f"output, for the participant: {out['path']}")
        lines.append(f"output on the app server: {outputs_root.rstrip('/')}/{out['path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
