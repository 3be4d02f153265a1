#!/usr/bin/env bash
# Make the course's GPU records, in priority order, on a machine with one CUDA GPU (no network needed).
#
#   scripts/gpu_record.sh [PART ...]          PART: bench | lora_causal_lm | scaling | finetuning | lora |
#                                             peft_family | char_lm | positions (these three: gpu length unmeasured)
#                                             (default: bench lora_causal_lm -- each part takes <= ~8 minutes)
#   scripts/gpu_record.sh --quick [PART ...]  the reduced form, on the CPU: every part runs its seconds-long
#                                             smoke version and writes to $QUICK_OUT (default: a temp folder),
#                                             never to data/results/. tests/test_gpu_record.py runs it in CI.
#
# Each record lands in data/results/ with its provenance (device, versions, date, commit). Where .git is
# absent (a copy carried to another machine) set COURSE_COMMIT to the commit the copy was made from.
# Packages the GPU machine lacks travel as wheels in .whl/ and assets as parts in .gpu-transfer/
# (scripts/gpu_bundle.py makes both); this script installs and reassembles them first if they are there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
QUICK=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    bench|lora_causal_lm|scaling|finetuning|lora|peft_family|char_lm|positions) PARTS+=("$arg") ;;
    *) echo "error: unknown part '$arg': choose bench, lora_causal_lm, scaling, finetuning, lora, peft_family, char_lm, positions (or --quick)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(bench lora_causal_lm)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" scripts/gpu_bundle.py install --target /tmp/course-site   # each wheel checked against its pinned SHA-256
  export PYTHONPATH=/tmp/course-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ls -d .gpu-transfer* >/dev/null 2>&1; then
  "$PY" scripts/gpu_bundle.py unpack
fi

if [ "$QUICK" = 1 ]; then
  OUT=${QUICK_OUT:-$(mktemp -d)}
  mkdir -p "$OUT"
  export CUDA_VISIBLE_DEVICES=""   # the reduced form is the CPU's, also on a GPU machine
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to torch; run with --quick for the CPU smoke form" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

run_part() {
  local part=$1 started=$SECONDS
  echo "== $part ($( [ "$QUICK" = 1 ] && echo quick || echo gpu ))"
  case "$part" in
    bench)
      if [ "$QUICK" = 1 ]; then
        "$PY" -m course_lib.experiments.bench all --quick --lora-model tiny --out "$OUT/gpu_benchmarks_quick.json" >/dev/null
      else
        "$PY" -m course_lib.experiments.bench all --lora-model smollm2-shape
      fi ;;
    *)
      if [ "$QUICK" = 1 ]; then
        "$PY" -m course_lib.experiments "$part" --quick --seeds 1 --out "$OUT/${part}_quick.json"
      else
        "$PY" -m course_lib.experiments "$part" --profile gpu --seeds 3
      fi ;;
  esac
  echo "== $part done in $((SECONDS - started)) s"
}

for part in "${PARTS[@]}"; do
  run_part "$part"
done
[ "$QUICK" = 1 ] && echo "quick records in $OUT"
exit 0
