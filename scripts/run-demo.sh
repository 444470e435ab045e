#!/usr/bin/env bash
# `make run`: the main job on the embedded default. Brings up the simulated Verda GPU
# host and app server (molecule/default: systemd containers, a loop device as scratch
# disk, redis-server with a password), converges them with the real site.yml, queues
# data/workflows/empty-image.json on the app server's Redis as the platform does, and
# prints the job's result and where its output landed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg" PY_COLORS=0 ANSIBLE_FORCE_COLOR=0
state="${COMFYUME_SIM_STATE:-/var/lib/comfyume-sim}"
workflow="${1:-data/workflows/empty-image.json}"
log="$state/run-demo.log"
mkdir -p "$state"

echo "== simulated hosts up and converged with site.yml (molecule converge; log: $log)"
if ! molecule converge -s default >"$log" 2>&1; then
  tail -60 "$log"
  echo "converge failed; the whole log is in $log" >&2
  exit 1
fi
grep -A3 'PLAY RECAP' "$log" | grep -E 'ok=' | sed 's/^[^a-z]*//' || true

redis_host="$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' app-server)"
echo "== queueing $workflow on the app server's Redis ($redis_host)"
python scripts/submit_job.py --host "$redis_host" --password-file "$state/redis-password" \
  --user demo --timeout 300 --host-outputs /mnt/scratch/outputs "$workflow" | tee "$state/run-demo.result"
echo "== the output file, as the GPU host sees it"
sed -n 's/^output on the GPU host: //p' "$state/run-demo.result" | while read -r path; do
  docker exec verda-sim ls -l "$path"
done
echo "== done. Tear down with: make clean-sim"
