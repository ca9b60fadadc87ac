#!/bin/bash
# The whole CPU reproduction of docs/results, one spec after another, resumable (rerun the same
# command to continue): the ten main specs, the ablations' stage 2 written from stage 1, then the
# edge tests written from the headline folders' best-at-edge flags. Wall-clock times go to
# OUT/timing.log. It took 74.7 minutes on the 2-core machine of docs/results (two runs at once).
#
#   scripts/reproduction.sh [OUT]        (default OUT: results/reproduction)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/reproduction}
BL=.venv/bin/batchlab
PY=.venv/bin/python
mkdir -p "$OUT"
LOG=$OUT/timing.log

run() {  # run NAME SPEC
  local t0
  t0=$(date +%s)
  echo "$(date -u +%FT%TZ) start $1" >> "$LOG"
  "$BL" local run "$2" --out "$OUT/$1" --no-progress > "$OUT/$1.log" 2>&1
  echo "$(date -u +%FT%TZ) end $1 wall=$(( $(date +%s) - t0 ))s" >> "$LOG"
}

for name in momentum adaptive momentum_large_batch adaptive_large_batch momentum_large_batch_split \
            table4 train_vs_validation ablation_base_160; do
  run "$name" "experiments/reproduction/$name.yaml"
done
"$PY" scripts/ablation_spec.py "$OUT/ablation_base_160" > "$OUT/ablations_160.yaml"
run ablations_160 "$OUT/ablations_160.yaml"
run scaling experiments/reproduction/scaling.yaml
for name in momentum adaptive momentum_large_batch adaptive_large_batch; do
  if "$PY" scripts/edge_spec.py "$OUT/$name" > "$OUT/${name}_edges.yaml" 2> "$OUT/${name}_edges.spec.log"; then
    run "${name}_edges" "$OUT/${name}_edges.yaml"
  else
    echo "$(date -u +%FT%TZ) no edge test for $name: $(tail -1 "$OUT/${name}_edges.spec.log")" >> "$LOG"
  fi
done
echo "$(date -u +%FT%TZ) all done" >> "$LOG"
