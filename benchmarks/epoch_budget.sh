#!/usr/bin/env bash
# BENCHMARKS.md "The training budget: calibration against epochs" (PROTOCOL.md "Scales": the `cpu` protocol must
# train MAP long enough to reach the overconfident regime; measure ECE against epochs and choose honestly).
# MAP LoRA on TASK (500 training questions, lr 3e-4, batch 8, bf16 as configs/smollm2-cpu.yaml), one run per
# budget: each is a whole run at that budget (warm-up and linear decay over its own steps), not a checkpoint of a
# longer one. Runs already in OUT are reused, and GRID's map-seed0 for 3 epochs (GRID: OUT/runs of
# configs/smollm2-cpu-3ep.yaml, whose settings these are but for the epochs).
#   bash benchmarks/epoch_budget.sh GRID_RUNS OUT TASK [EPOCHS...]     (default epochs: 1 2 3 5 10 20)
set -euo pipefail
GRID=${1:?GRID_RUNS}; OUT=${2:?OUT}; TASK=${3:?TASK}; shift 3
[ $# -gt 0 ] || set -- 1 2 3 5 10 20
BUDGETS=("$@")
UQ=${UQLORA:-.venv/bin/uqlora}
COMMON=(--model smollm2-135m --task "$TASK" --split train --max-examples 500 --lr 3e-4 --batch-size 8 --dtype bfloat16
        --method map --quiet)
EVAL=(--task "$TASK" --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"

RUNS=()
for E in "${BUDGETS[@]}"; do
  RUN="$OUT/$TASK/map-${E}ep"
  if [ "$E" = 3 ] && [ -f "$GRID/$TASK/map-seed0/train_summary.json" ]; then RUN="$GRID/$TASK/map-seed0"; fi
  train "$RUN" 0 --epochs "$E"
  evaluate "$RUN" "$TASK"
  RUNS+=("$RUN")
done
$UQ compare "${RUNS[@]}" --task "$TASK" --out "$OUT/$TASK"
