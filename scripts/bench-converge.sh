#!/usr/bin/env bash
# Benchmark (not a test): the first converge of site.yml on fresh simulated hosts beside
# an idempotent re-run, measured in the same run. Prints both, their ratio, and the
# re-run's changed count. Goal: re-run <= 1/5 of the first converge, changed=0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg" PY_COLORS=0 ANSIBLE_FORCE_COLOR=0

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

echo "== fresh simulated hosts (molecule destroy, create, prepare)"
molecule destroy -s default >/dev/null 2>&1 || true
molecule create -s default >/dev/null 2>&1
molecule prepare -s default --force >/dev/null 2>&1

converge() {
  local out="$1" start end
  start=$(date +%s.%N)
  ansible-playbook -i inventories/local site.yml >"$out" 2>&1 || { tail -40 "$out"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
changed() { awk '/PLAY RECAP/{r=1;next} r&&/changed=/{for(i=1;i<=NF;i++) if($i ~ /^changed=/){split($i,a,"="); s+=a[2]}} END{print s+0}' "$1"; }

first=$(converge "$log/first")
second=$(converge "$log/second")
ratio=$(python3 -c "print(f'{$second / $first:.2f}')")
printf '\n%-28s %10s %10s\n' "" "seconds" "changed"
printf '%-28s %10s %10s\n' "first converge" "$first" "$(changed "$log/first")"
printf '%-28s %10s %10s\n' "idempotent re-run" "$second" "$(changed "$log/second")"
printf '%-28s %10s   (goal <= 0.20, changed=0)\n' "re-run / first" "$ratio"
