#!/usr/bin/env bash
# Benchmark (not a test): how long a GPU host takes to a healthy worker when it builds the
# worker image, beside a host that loads the tarball the first one left in the shared
# cache, measured in the same run on the fleet scenario's hosts (molecule/fleet). Also the
# tarball's size and format, and docker load of the same image as zstd and as plain tar.
# Goal: a host that loads is ready in at most 1/5 of the building host's time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg" PY_COLORS=0 ANSIBLE_FORCE_COLOR=0
inventory=inventories/local/fleet.yml
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

echo "== fresh fleet hosts, converged up to the worker role (molecule create, prepare; site.yml --skip-tags worker)"
molecule destroy -s fleet >/dev/null 2>&1 || true
molecule create -s fleet >"$log/create" 2>&1 || { tail -30 "$log/create"; exit 1; }
molecule prepare -s fleet --force >"$log/prepare" 2>&1 || { tail -30 "$log/prepare"; exit 1; }
ansible-playbook -i "$inventory" site.yml --skip-tags worker >"$log/base" 2>&1 || { tail -40 "$log/base"; exit 1; }

# worker.yml on one host, from nothing to healthy workers; prints the seconds it took.
to_healthy() {
  local host="$1" start end
  start=$(date +%s.%N)
  ansible-playbook -i "$inventory" playbooks/worker.yml -l "$host" >"$log/$host" 2>&1 \
    || { tail -40 "$log/$host"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
source_of() { docker exec "$1" python3 -c 'import json; print(json.load(open("/var/lib/comfyume/worker-image.json"))["source"])'; }

build=$(to_healthy fleet-gpu-1)
load=$(to_healthy fleet-gpu-2)
tarball=$(docker exec fleet-gpu-1 sh -c 'ls /mnt/sfs/cache/images/*.tar.zst | head -1')
bytes=$(docker exec fleet-gpu-1 stat -c %s "$tarball")
image=$(docker exec fleet-gpu-1 docker inspect -f '{{.Config.Image}}' worker-1)
image_bytes=$(docker exec fleet-gpu-1 docker image inspect -f '{{.Size}}' "$image")

# The same image both ways on the third host: zstd as written, and plain tar.
docker exec fleet-gpu-3 sh -c 'command -v zstd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd >/dev/null 2>&1'
fmt_seconds() {
  local cmd="$1" start end
  docker exec fleet-gpu-3 sh -c "docker image rm -f $image >/dev/null 2>&1 || true"
  start=$(date +%s.%N)
  docker exec fleet-gpu-3 bash -o pipefail -c "$cmd" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
zst_load=$(fmt_seconds "zstd -dc $tarball | docker load")
docker exec fleet-gpu-3 sh -c "docker save -o /mnt/scratch/temp/plain.tar $image"
tar_bytes=$(docker exec fleet-gpu-3 stat -c %s /mnt/scratch/temp/plain.tar)
tar_load=$(fmt_seconds "docker load -i /mnt/scratch/temp/plain.tar")
docker exec fleet-gpu-3 rm -f /mnt/scratch/temp/plain.tar

printf '\n%-44s %10s %s\n' "" "seconds" "image from"
printf '%-44s %10s %s\n' "fleet-gpu-1: worker.yml to healthy (builds)" "$build" "$(source_of fleet-gpu-1)"
printf '%-44s %10s %s\n' "fleet-gpu-2: worker.yml to healthy (loads)" "$load" "$(source_of fleet-gpu-2)"
printf '%-44s %10s   (goal <= 0.20)\n' "loads / builds" "$(python3 -c "print(f'{$load / $build:.2f}')")"
printf '\nimage %s: %s MB in the engine\n' "$image" "$((image_bytes / 1000000))"
printf '%-44s %10s %10s\n' "cache tarball" "MB" "load s"
printf '%-44s %10s %10s\n' "zstd -3 (what the play writes)" "$((bytes / 1000000))" "$zst_load"
printf '%-44s %10s %10s\n' "plain tar (worker_image_cache_format: tar)" "$((tar_bytes / 1000000))" "$tar_load"
echo
echo "steps on each host (seconds):"
for host in fleet-gpu-1 fleet-gpu-2; do
  docker exec -i "$host" python3 - "$host" <<'PY'
import json, sys
record = json.load(open("/var/lib/comfyume/worker-image.json"))
print(f"  {sys.argv[1]}: " + ", ".join(f"{s['step']} {s['seconds']:.1f}" for s in record["steps"]))
PY
done
molecule destroy -s fleet >/dev/null 2>&1 || true
