#!/usr/bin/env bash
# Sets up the REAL ComfyUI v0.11.0 on the CPU, outside this repository, so the contract tests in
# comfyui-worker/tests/contract/ can check the stand-in against it.
#
#   scripts/setup-real-comfyui.sh [DEST] [GIT_DIR]
#
# DEST     where to check ComfyUI out (default: $COMFYUI_SOURCE, else /work/comfyui-src); must lie
#          outside this repository. A venv is made in DEST/.venv.
# GIT_DIR  an already-fetched git directory (bare or not) of a ComfyUI repository that carries the
#          v0.11.0 release commit (default: $COMFYUI_GIT_DIR, else the first /work/.mirror/*/repo
#          that has it). This script downloads no source; it only checks out what is there.
#
# Then:  COMFYUI_SOURCE=DEST .venv/bin/pytest comfyui-worker/tests/contract -m comfyui_real
#
# torch==2.14.1 and torchvision==0.29.1 come from the package indexes pip is configured with
# (about 5.5 GB); the rest of ComfyUI's requirements.txt from PyPI. Safe to run again.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
release_commit="09725967cf76304371c390ca1d6483e04061da48"  # "ComfyUI version v0.11.0"
torch_pins=("torch==2.14.1" "torchvision==0.29.1")
python_bin="${COMFYUI_SETUP_PYTHON:-python3.11}"

log() { printf '[setup-real-comfyui] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

dest="${1:-${COMFYUI_SOURCE:-/work/comfyui-src}}"
git_dir="${2:-${COMFYUI_GIT_DIR:-}}"

if [[ -z "$git_dir" ]]; then
  for candidate in /work/.mirror/*/repo; do
    [[ -d "$candidate" ]] || continue
    if git -C "$candidate" cat-file -e "${release_commit}^{commit}" 2>/dev/null; then
      git_dir="$candidate"
      break
    fi
  done
fi
[[ -n "$git_dir" ]] || die "no git directory with commit ${release_commit} found; pass GIT_DIR"
git -C "$git_dir" cat-file -e "${release_commit}^{commit}" 2>/dev/null \
  || die "$git_dir does not carry commit ${release_commit} (ComfyUI v0.11.0)"

mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
case "$dest/" in
  "$repo_root"/*) die "DEST ($dest) is inside this repository; choose a directory outside it" ;;
esac

if [[ ! -e "$dest/.git" ]]; then
  log "cloning $git_dir into $dest"
  git clone --quiet --no-checkout "$git_dir" "$dest"
fi
if [[ "$(git -C "$dest" rev-parse HEAD 2>/dev/null || true)" != "$release_commit" ]]; then
  log "checking out v0.11.0 ($release_commit)"
  # A snapshot may lack its largest files (e.g. a 4+ MiB tokenizer.json); git names them on
  # stderr. Those are model tokenizers, not needed by the API or the nodes the tests use.
  git -C "$dest" -c advice.detachedHead=false checkout --quiet --detach "$release_commit" 2>&1 \
    | grep -v -E '^error: (unable to read sha1 file|invalid object)' >&2 || true
  [[ "$(git -C "$dest" rev-parse HEAD)" == "$release_commit" ]] || die "checkout failed"
fi
missing_files="$(git -C "$dest" ls-files --deleted)"
if [[ -n "$missing_files" ]]; then
  log "files absent from the fetched snapshot (not needed here): $(echo "$missing_files" | tr '\n' ' ')"
fi

venv="$dest/.venv"
stamp="$venv/.comfyui-setup-done"
want_stamp="$release_commit ${torch_pins[*]} $(sha256sum "$dest/requirements.txt" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; then
  log "already set up: COMFYUI_SOURCE=$dest (python: $venv/bin/python)"
  exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating venv $venv with $python_bin"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)

# Pins for torch and friends, so the rest of requirements.txt cannot pull another torch.
pins_file="$dest/.venv/comfyui-setup-constraints.txt"
printf '%s\n' "${torch_pins[@]}" >"$pins_file"

log "installing ${torch_pins[*]} (large; this takes a while)"
"${pip[@]}" -c "$pins_file" "${torch_pins[@]}"

# torchaudio is left out of the main install: its wheels pin one torch each, and ComfyUI only
# needs it for audio nodes, which it skips with a warning when torchaudio is missing.
reqs="$dest/.venv/comfyui-requirements-no-torch.txt"
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)([[:space:]]*([<>=!~].*)?)?$' \
  "$dest/requirements.txt" >"$reqs"
log "installing the rest of ComfyUI's requirements.txt"
"${pip[@]}" -c "$pins_file" -r "$reqs"
if ! "${pip[@]}" -c "$pins_file" torchaudio 2>/dev/null; then
  log "no torchaudio matches torch ${torch_pins[0]#torch==}; ComfyUI runs without its audio nodes"
fi

log "checking that it imports"
"$venv/bin/python" -c 'import torch, torchvision, aiohttp; print("torch", torch.__version__)'
printf '%s\n' "$want_stamp" >"$stamp"
log "done: COMFYUI_SOURCE=$dest (python: $venv/bin/python)"
