#!/usr/bin/env bash
# `make run`: the main job on the embedded default. Brings up the simulated Verda GPU
# host and app server (molecule/default: systemd containers, a loop device as scratch
# disk, redis-server with a password), converges them with the real site.yml, queues
# data/workflows/empty-image.json on the app server's Redis as the platform does, prints
# the job's result and where its output landed (the app server's outputs folder), then
# hands that image back as a participant's upload to data/workflows/load-image.json.
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

redis_host="$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' app-server | cut -d' ' -f1)"
echo "== queueing $workflow on the app server's Redis ($redis_host)"
python scripts/submit_job.py --host "$redis_host" --password-file "$state/redis-password" \
  --user demo --timeout 300 --outputs-root /home/dev/comfyume/data/outputs "$workflow" \
  | tee "$state/run-demo.result"
echo "== the output file, delivered to the app server's outputs folder (what the participant sees)"
sed -n 's/^output on the app server: //p' "$state/run-demo.result" | while read -r path; do
  docker exec app-server ls -l "$path"
done
echo "== a participant's upload: the output above, placed in the app server's inputs folder as"
echo "   data/inputs/demo/uploads/sample.png (what a frontend upload does), read by LoadImage"
first="$(sed -n 's/^output on the app server: //p' "$state/run-demo.result" | head -n1)"
docker exec app-server install -D -o dev -g dev -m 0644 "$first" \
  /home/dev/comfyume/data/inputs/demo/uploads/sample.png
python scripts/submit_job.py --host "$redis_host" --password-file "$state/redis-password" \
  --user demo --timeout 300 --outputs-root /home/dev/comfyume/data/outputs \
  data/workflows/load-image.json | tee "$state/run-demo-upload.result"
echo "== done. Tear down with: make clean-sim"
