#!/usr/bin/env bash
# Brings a fresh Debian machine to the point where `make run` and `make test` work:
# Debian's Docker engine (started in the background when no daemon answers), the tools
# that build the simulated hosts, a local redis-server for the worker's tests, nginx for the
# file exchange's tests, and the project's Python virtual environment with pinned packages.
# Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[bootstrap] %s\n' "$*" >&2; }

apt_packages=(docker.io debootstrap redis-server nginx e2fsprogs util-linux iproute2 make)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd in the background (log: /var/log/comfyume-dockerd.log)"
  # setsid: the daemon must outlive the shell that started it.
  setsid dockerd >/var/log/comfyume-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/comfyume-dockerd.log"; exit 1; }
fi

py="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want="$(cat requirements-dev.txt constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "installing pinned Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt -c constraints.txt
  echo "$want" > "$stamp"
fi
log "ready"
