#!/usr/bin/env bash
# Builds the local base images the simulated hosts and the worker image start from.
# No container registry is reachable on the CI machines, so every image is made here
# from the distributions' packages. An image is rebuilt only when its recipe changes:
# each one carries a label with the hash of the recipe it was built from.
#
#   build.sh          Debian images: the Verda-like host, the app server, the worker base
#   build.sh ubuntu   the Ubuntu 22.04 host without Docker (molecule/ubuntu)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="${COMFYUME_SIM_SUITE:-trixie}"
mirror="${COMFYUME_SIM_MIRROR:-http://deb.debian.org/debian}"
ubuntu_suite="${COMFYUME_SIM_UBUNTU_SUITE:-jammy}"
ubuntu_mirror="${COMFYUME_SIM_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
# debootstrap fetches Ubuntu over HTTPS: this machine has no Ubuntu archive keyring to
# check the Release files with. Inside the image apt checks them with Ubuntu's own keyring.
ubuntu_bootstrap_mirror="${COMFYUME_SIM_UBUNTU_BOOTSTRAP_MIRROR:-https://archive.ubuntu.com/ubuntu}"

log() { printf '[images] %s\n' "$*" >&2; }

recipe_hash() {
  # Hash of the recipe's words plus the named files: a change to any of them rebuilds.
  { printf '%s\n' "$1"; shift; cat "$@"; } | sha256sum | cut -c1-16
}

have_image() {
  local name="$1" want="$2" got
  got="$(docker image inspect -f '{{ index .Config.Labels "comfyume.recipe" }}' "$name" 2>/dev/null || true)"
  [[ "$got" == "$want" ]]
}

no_recommends='APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'

# build_minbase NAME SUITE MIRROR COMPONENTS [SOURCES_LIST]
# SOURCES_LIST, when given, replaces the sources.list that debootstrap wrote.
build_minbase() {
  local name="$1" release="$2" url="$3" components="$4" sources="${5:-}" h
  h="$(recipe_hash "minbase $release $url $components $sources $no_recommends")"
  if have_image "$name" "$h"; then log "$name is current"; return; fi
  log "debootstrap $release (minbase) into a temporary root"
  local root
  root="$(mktemp -d)"
  trap 'rm -rf "${root:-}"; trap - RETURN' RETURN
  debootstrap --variant=minbase --include=ca-certificates --components="$components" \
    "$release" "$root" "$url" >/dev/null
  # Keep apt lean inside the images.
  printf "$no_recommends" > "$root/etc/apt/apt.conf.d/90comfyume-no-recommends"
  if [[ -n "$sources" ]]; then printf '%s\n' "$sources" > "$root/etc/apt/sources.list"; fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change "LABEL comfyume.recipe=$h" - "$name" >/dev/null
  log "imported $name"
}

# build_from_dockerfile NAME DOCKERFILE BASE
build_from_dockerfile() {
  local name="$1" dockerfile="$2" base="$3" h
  h="$(recipe_hash "from $base $(docker image inspect -f '{{.Id}}' "$base")" "$dockerfile")"
  if have_image "$name" "$h"; then log "$name is current"; return; fi
  log "building $name"
  docker build -q --label "comfyume.recipe=$h" --build-arg "BASE=$base" \
    -t "$name" -f "$dockerfile" "$here" >/dev/null
  log "built $name"
}

case "${1:-debian}" in
  debian)
    debian_base="comfyume/${suite}-minbase:latest"
    build_minbase "$debian_base" "$suite" "$mirror" main
    build_from_dockerfile comfyume/verda-sim:latest "$here/verda-sim.Dockerfile" "$debian_base"
    build_from_dockerfile comfyume/appserver-sim:latest "$here/appserver-sim.Dockerfile" "$debian_base"
    build_from_dockerfile comfyume/worker-base:latest "$here/worker-base.Dockerfile" "$debian_base"
    ;;
  ubuntu)
    ubuntu_base="comfyume/${ubuntu_suite}-minbase:latest"
    build_minbase "$ubuntu_base" "$ubuntu_suite" "$ubuntu_bootstrap_mirror" main,universe \
      "$(printf 'deb %s %s main universe\n' "$ubuntu_mirror" "$ubuntu_suite" \
           "$ubuntu_mirror" "${ubuntu_suite}-updates")"
    build_from_dockerfile comfyume/ubuntu-sim:latest "$here/ubuntu-sim.Dockerfile" "$ubuntu_base"
    ;;
  *)
    log "unknown image set '$1' (expected debian or ubuntu)"
    exit 2
    ;;
esac
