#!/usr/bin/env bash
# Re-make the cpu records the lessons read, one at a time, from a clean commit, with one torch thread per
# process, logging the 1-minute load average before and after each (README "Recorded runs").
# A record's provenance names the commit and whether tracked files differ when it is written, so each
# record is committed as soon as it is written: the next one then starts from a clean commit again.
#   bash scripts/record_all.sh [NAME ...]      (default: every registered experiment)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "error: the working tree has uncommitted changes; a record must name a clean commit (commit first)." >&2
    exit 2
fi
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=(positions char_lm char_lm_reference scaling finetuning lora peft_family)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for name in "${names[@]}"; do
    seeds=3
    [ "$name" = char_lm ] && seeds=2
    start=$(date +%s)
    echo "[$(date -u +%H:%M:%S)] $name: start, load $(cut -d' ' -f1 /proc/loadavg), commit $(git rev-parse --short HEAD)"
    "$PY" -m course_lib.experiments "$name" --profile cpu --seeds "$seeds"
    echo "[$(date -u +%H:%M:%S)] $name: done, load $(cut -d' ' -f1 /proc/loadavg)"
    git add "data/results/${name}_cpu.json"
    git commit -q -m "Record: $name (cpu, --seeds $seeds, $(( $(date +%s) - start )) s, one torch thread, from $(git rev-parse --short HEAD))"
done
