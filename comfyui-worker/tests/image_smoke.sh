#!/usr/bin/env bash
# Builds the worker image on a local base (no registry needed) with the ComfyUI stand-in as
# ComfyUI, runs it as docker-compose.yml does (every capability dropped but SETUID, SETGID and
# KILL, no-new-privileges, the Redis password a root-only file mounted read-only) against a
# password-protected redis-server on the host, and checks that it becomes healthy, completes a
# job with its output on the host, fails its HEALTHCHECK when ComfyUI or the worker loop is gone,
# runs the worker and ComfyUI as comfy, keeps the password from comfy (the file, the worker's
# environment and memory), out of process lists, `docker inspect` and the logs, and stops
# cleanly.
#
#   tests/image_smoke.sh            # BASE_IMAGE defaults to comfyume/worker-base:latest
# Exit 0 pass, 1 fail, 77 skipped (no docker daemon or no base image).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_image="${BASE_IMAGE:-comfyume/worker-base:latest}"
tag="${SMOKE_TAG:-comfyui-worker:smoke}"
python="${PYTHON:-$here/../.venv/bin/python}"
[[ -x "$python" ]] || python=python3

say() { printf '[image-smoke] %s\n' "$*" >&2; }
skip() { say "SKIP: $*"; exit 77; }

docker info >/dev/null 2>&1 || skip "no docker daemon"
docker image inspect "$base_image" >/dev/null 2>&1 || skip "base image $base_image not present"
command -v redis-server >/dev/null || skip "redis-server not installed"

work="$(mktemp -d /tmp/worker-smoke.XXXXXX)"
container=""
redis_pid=""
cleanup() {
  [[ -n "$container" ]] && docker rm -f "$container" >/dev/null 2>&1 || true
  [[ -n "$redis_pid" ]] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. A build context of its own, so the repository's ComfyUI/ and wheels/ stay untouched.
ctx="$work/context"
mkdir -p "$ctx/wheels"
cp "$here"/Dockerfile "$here"/.dockerignore "$here"/*.py "$here"/requirements.txt "$here"/comfyui-requirements.lock \
  "$here"/vram_table.json "$here"/extra_model_paths.yaml "$ctx/"
cp -r "$here/tests/comfyui_standin" "$ctx/ComfyUI"
rm -rf "$ctx/ComfyUI/temp" "$ctx/ComfyUI/__pycache__"

pyver="$(docker run --rm --entrypoint python3 "$base_image" -c \
  'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
say "downloading wheels for Python $pyver (manylinux x86_64)"
reqs=(-r "$here/requirements.txt")
[[ -f "$ctx/ComfyUI/requirements.txt" ]] && reqs+=(-r "$ctx/ComfyUI/requirements.txt")
"$python" -m pip download -q --only-binary=:all: --implementation cp --python-version "$pyver" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -c "$here/comfyui-requirements.lock" "${reqs[@]}" -d "$ctx/wheels" 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2

say "building $tag on $base_image"
previous="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
docker build -q -t "$tag" \
  --build-arg BASE_IMAGE="$base_image" \
  --build-arg PIP_INSTALL_ARGS="--no-index --find-links /tmp/wheels" \
  "$ctx" >/dev/null
# The previous build of this tag would stay behind as a dangling image.
if [[ -n "$previous" && "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi

# 2. Redis on the host's loopback, password given on stdin (never on a command line).
port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
comfy_port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# What Compose's env-file syntax would cut (` #`) or expand (`$`): it must arrive whole.
password="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') #c\$d"
printf 'port %s\nbind 127.0.0.1\nrequirepass "%s"\nsave ""\nappendonly no\n' "$port" "$password" \
  | redis-server - >"$work/redis.log" 2>&1 &
redis_pid=$!
# The password as the play leaves it: a root:root 0400 file in a root 0700 folder.
install -d -o root -g root -m 0700 "$work/secrets"
printf '%s\n' "$password" >"$work/secrets/redis-password"
chown root:root "$work/secrets/redis-password"
chmod 0400 "$work/secrets/redis-password"

mkdir -p "$work/data/outputs" "$work/data/inputs" "$work/data/models"
chown -R 1000:1000 "$work/data"
printf 'REDIS_HOST=127.0.0.1\nREDIS_PORT=%s\nREDIS_PASSWORD_FILE=/run/secrets/redis-password\n' \
  "$port" >"$work/env"
printf 'WORKER_ID=smoke-1\nOUTPUT_DELIVERY=local\n' >>"$work/env"
printf 'COMFYUI_URL=http://127.0.0.1:%s\nCOMFYUI_ARGS=--cpu\nQUEUE_POLL_INTERVAL=2\n' \
  "$comfy_port" >>"$work/env"

# 3. Run it; host networking reaches the host's loopback Redis.
container="$(docker run -d --network host --env-file "$work/env" \
  --cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL \
  --security-opt no-new-privileges:true \
  -v "$work/secrets/redis-password:/run/secrets/redis-password:ro" \
  -v "$work/data/outputs:/outputs" -v "$work/data/inputs:/inputs" -v "$work/data/models:/models:ro" \
  --health-interval 2s --health-timeout 5s --health-start-period 60s --health-retries 3 \
  --stop-timeout 30 "$tag")"

say "waiting for the container to become healthy"
for _ in $(seq 1 90); do
  health="$(docker inspect -f '{{.State.Health.Status}}' "$container")"
  [[ "$health" == healthy ]] && break
  [[ "$(docker inspect -f '{{.State.Running}}' "$container")" == true ]] || break
  sleep 1
done
if [[ "$health" != healthy ]]; then
  docker logs "$container" >&2 || true
  say "FAIL: container is $health"
  exit 1
fi

# 4. A job through Redis, as the queue-manager queues it.
job_id="$(REDIS_PORT="$port" REDIS_PASSWORD="$password" "$python" - <<'EOF'
import json, os, time, uuid, datetime, redis
r = redis.Redis(port=int(os.environ["REDIS_PORT"]), password=os.environ["REDIS_PASSWORD"])
jid = str(uuid.uuid4())
now = datetime.datetime.now(datetime.timezone.utc)
wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
      "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}}}
doc = {"id": jid, "user_id": "alice", "workflow": wf, "status": "pending", "priority": 2,
       "created_at": now.isoformat(), "started_at": None, "completed_at": None,
       "worker_id": None, "result": None, "error": None, "metadata": {}}
r.set(f"job:{jid}", json.dumps(doc))
r.zadd("queue:pending", {jid: 2_000_000 + now.timestamp()})
r.publish("queue:updates", json.dumps({"type": "job_created", "data": doc, "timestamp": now.isoformat()}))
for _ in range(300):
    d = json.loads(r.get(f"job:{jid}"))
    if d["status"] in ("completed", "failed"):
        break
    time.sleep(0.1)
assert d["status"] == "completed", d
print(jid)
EOF
)"
files=("$work/data/outputs/alice/$job_id"/*.png)
[[ -f "${files[0]}" ]] || { say "FAIL: no output on the host for $job_id"; exit 1; }
say "job $job_id completed; output on the host: ${files[0]#"$work/"}"

# 5. The HEALTHCHECK fails when ComfyUI or the worker loop is gone.
if docker exec -e COMFYUI_URL=http://127.0.0.1:1 "$container" \
  /opt/worker-venv/bin/python /app/healthcheck.py >/dev/null; then
  say "FAIL: healthcheck passed with ComfyUI unreachable"; exit 1
fi
if docker exec -e HEALTH_FILE=/nonexistent "$container" \
  /opt/worker-venv/bin/python /app/healthcheck.py >/dev/null; then
  say "FAIL: healthcheck passed without the worker loop's health file"; exit 1
fi

# 6. The worker and ComfyUI run as comfy (the worker drops root once it has read the password);
# tini alone stays root. comfy, ComfyUI's user, reads neither the password's file nor the
# worker's environment or memory. No command line, configuration or log holds the password.
comfy_uid="$(docker exec "$container" id -u comfy)"
[[ "$comfy_uid" != 0 ]] || { say "FAIL: comfy is root"; exit 1; }
listing="$(docker top "$container" -eo pid,uid,args)"
for marker in /app/worker.py "main.py --listen"; do
  uids="$(awk -v m="$marker" 'NR > 1 && $3 != "tini" && index($0, m) { print $2 }' <<<"$listing" | sort -u)"
  [[ "$uids" == "$comfy_uid" ]] || { say "FAIL: $marker runs as uid '$uids'"; echo "$listing" >&2; exit 1; }
done
if docker exec --user comfy "$container" cat /run/secrets/redis-password >/dev/null 2>&1; then
  say "FAIL: comfy can read the password's file"; exit 1
fi
reach="$(docker exec -i --user comfy "$container" /opt/worker-venv/bin/python - <<'EOF'
import os
def cmdline(p):
    try:
        return open(f"/proc/{p}/cmdline", "rb").read()
    except OSError:
        return b""
# tini, PID 1, names the worker's command line too.
[pid] = [p for p in os.listdir("/proc") if p.isdigit() and p != "1" and b"/app/worker.py" in cmdline(p)]
for what in ("environ", "mem"):
    try:
        open(f"/proc/{pid}/{what}", "rb").close()  # the kernel decides at open
        print(f"{what}: opened")
    except PermissionError:
        print(f"{what}: denied")
EOF
)"
[[ "$reach" == $'environ: denied\nmem: denied' ]] || { say "FAIL: comfy reaches the worker: $reach"; exit 1; }
# Each output is read whole before it is searched: `grep -q` ending a pipe early would fail the
# pipe (pipefail) and read as "not found".
cmdlines="$(docker exec "$container" sh -c 'cat /proc/[0-9]*/cmdline 2>/dev/null; true' | tr '\0' ' ')"
inspected="$(docker inspect "$container")"
history="$(docker history --no-trunc "$tag")"
logs="$(docker logs "$container" 2>&1)"
for place in cmdlines inspected history logs; do
  if grep -qF -- "$password" <<<"${!place}"; then
    say "FAIL: the Redis password is in $place"; exit 1
  fi
done
grep -q "running as comfy (uid $comfy_uid" <<<"$logs" \
  || { say "FAIL: the worker did not log its drop to comfy"; exit 1; }

# 7. docker stop: the worker stops ComfyUI and exits 0.
docker stop "$container" >/dev/null
code="$(docker inspect -f '{{.State.ExitCode}}' "$container")"
[[ "$code" == 0 ]] || { docker logs "$container" >&2; say "FAIL: exit code $code"; exit 1; }
say "PASS"
