#!/usr/bin/env bash
# Benchmark (not a test): the first converge of site.yml on fresh simulated hosts beside
# an idempotent re-run, measured in the same run. Prints both, their ratio, and the
# re-run's changed count. Goal: re-run <= 1/5 of the first converge, changed=0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg" PY_COLORS=0 ANSIBLE_FORCE_COLOR=0
# Both runs time every task, so the re-run's cost can be broken down below.
export ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks PROFILE_TASKS_TASK_OUTPUT_LIMIT=all

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

echo "== fresh simulated hosts (molecule destroy, create, prepare)"
molecule destroy -s default >/dev/null 2>&1 || true
molecule create -s default >/dev/null 2>&1
molecule prepare -s default --force >/dev/null 2>&1

converge() {
  local out="$1" start end
  start=$(date +%s.%N)
  ansible-playbook -i inventories/local/hosts.yml site.yml >"$out" 2>&1 || { tail -40 "$out"; exit 1; }
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

# Where the re-run's time goes: tasks that run a module on the host take a few tenths of a
# second each (remote Python start-up); tasks decided on the controller take hundredths.
breakdown() {
  python3 - "$1" <<'PY'
import re, sys
recap = open(sys.argv[1]).read().split("TASKS RECAP", 1)[-1]
times = [(m[1].strip(), float(m[2])) for m in re.finditer(r"^(.*?) -{3,} (\d+\.\d+)s$", recap, re.M)]
heavy = [t for t in times if t[1] >= 0.15]
light = [t for t in times if t[1] < 0.15]
print(f"{'  tasks >= 0.15 s':28s} {sum(t for _, t in heavy):10.1f} {len(heavy):10d} tasks")
print(f"{'  tasks <  0.15 s':28s} {sum(t for _, t in light):10.1f} {len(light):10d} tasks")
for name, t in sorted(heavy, key=lambda x: -x[1])[:5]:
    print(f"    {t:5.2f} s  {name}")
PY
}
printf '\nre-run by task (profile_tasks):\n'
breakdown "$log/second"

