#!/usr/bin/env bash
# Builds the local base images the simulated hosts and the worker image start from.
# No container registry is reachable on the CI machines, so every image is made here
# from Debian's packages. An image is rebuilt only when its recipe changes: each one
# carries a label with the hash of the files it was built from.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="${COMFYUME_SIM_SUITE:-trixie}"
mirror="${COMFYUME_SIM_MIRROR:-http://deb.debian.org/debian}"

log() { printf '[images] %s\n' "$*" >&2; }

recipe_hash() {
  # Hash of this script plus the named Dockerfiles: a change to any of them rebuilds.
  cat "$here/build.sh" "$@" | sha256sum | cut -c1-16
}

have_image() {
  local name="$1" want="$2" got
  got="$(docker image inspect -f '{{ index .Config.Labels "comfyume.recipe" }}' "$name" 2>/dev/null || true)"
  [[ "$got" == "$want" ]]
}

build_minbase() {
  local name="comfyume/${suite}-minbase:latest" h
  h="$(recipe_hash)"
  if have_image "$name" "$h"; then log "$name is current"; return; fi
  log "debootstrap $suite (minbase) into a temporary root"
  local root
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' RETURN
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
  # Keep apt lean inside the images.
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$root/etc/apt/apt.conf.d/90comfyume-no-recommends"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change "LABEL comfyume.recipe=$h" - "$name" >/dev/null
  log "imported $name"
}

build_from_dockerfile() {
  local name="$1" dockerfile="$2" h
  h="$(recipe_hash "$dockerfile")"
  if have_image "$name" "$h"; then log "$name is current"; return; fi
  log "building $name"
  docker build -q --label "comfyume.recipe=$h" --build-arg "BASE=comfyume/${suite}-minbase:latest" \
    -t "$name" -f "$dockerfile" "$here" >/dev/null
  log "built $name"
}

build_minbase
build_from_dockerfile comfyume/verda-sim:latest "$here/verda-sim.Dockerfile"
build_from_dockerfile comfyume/appserver-sim:latest "$here/appserver-sim.Dockerfile"
build_from_dockerfile comfyume/worker-base:latest "$here/worker-base.Dockerfile"
