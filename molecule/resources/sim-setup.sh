#!/usr/bin/env bash
# Prepares this machine for the simulated hosts: the local base images, the wheels the
# worker image is built from offline, and the block devices the simulated Verda hosts
# see as their data disks. Each disk is a sparse file attached to a loop device and
# published under a stable name, /dev/comfyume-<disk>, that the scenario's platform passes
# into a container as /dev/vdX. Idempotent: an attached disk is reused, never wiped here.
#
#   sim-setup.sh                 the default scenario's disks: sim-vdb sim-vdc sim-vdd
#   sim-setup.sh DISK...         others, e.g. fleet-1-vdb fleet-2-vdb (molecule/fleet)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state_dir="${COMFYUME_SIM_STATE:-/var/lib/comfyume-sim}"
size="${COMFYUME_SIM_DISK_SIZE:-1G}"

"$here/images/build.sh"

mkdir -p "$state_dir"

# pip inside the nested containers cannot reach PyPI (no CA for this workplace's TLS
# proxy there), so the worker image is built from wheels fetched here, for the
# simulated image's Python (Debian trixie: 3.13).
repo="$(cd "$here/../.." && pwd)"
wheels="$state_dir/wheels"
reqs=("$repo/comfyui-worker/requirements.txt" "$repo/comfyui-worker/tests/comfyui_standin/requirements.txt")
want="$(cat "${reqs[@]}" "$repo/comfyui-worker/comfyui-requirements.lock" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$wheels/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  rm -rf "$wheels"
  mkdir -p "$wheels"
  "${PYTHON:-$repo/.venv/bin/python}" -m pip download -q --only-binary=:all: \
    --python-version 3.13 --implementation cp --abi cp313 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    -c "$repo/comfyui-worker/comfyui-requirements.lock" -d "$wheels" $(printf -- '-r %s ' "${reqs[@]}")
  echo "$want" > "$wheels/.requirements.sha256"
  printf '[sim-setup] wheels for the worker image in %s\n' "$wheels" >&2
fi

disks=("$@")
((${#disks[@]})) || disks=(sim-vdb sim-vdc sim-vdd)
for disk in "${disks[@]}"; do
  [[ "$disk" =~ ^[a-z0-9-]+$ ]] || { echo "[sim-setup] bad disk name: $disk" >&2; exit 2; }
  img="$state_dir/disk-$disk.img"
  link="/dev/comfyume-$disk"
  [[ -f "$img" ]] || truncate -s "$size" "$img"
  loop="$(losetup -j "$img" -O NAME -n | head -n1 | tr -d ' ')"
  if [[ -z "$loop" ]]; then
    loop="$(losetup -f --show "$img")"
  fi
  ln -sfn "$loop" "$link"
  printf '[sim-setup] %s -> %s (%s)\n' "$link" "$loop" "$img" >&2
done
