#!/usr/bin/env bash
# BENCHMARKS.md "SWAG family": SmolLM2-135M, MAP vs MC dropout vs SWA vs SWAG vs deep ensemble vs MultiSWAG at
# the `cpu` scale of PROTOCOL.md and the training budget of benchmarks/foundation.sh (500 training questions
# drawn with a fixed seed from the official train split, 3 epochs, lr 3e-4, batch 8; 500 test questions).
# SWA/SWAG collect every 5 steps over the second half of training at a constant lr of 1e-4 (Onal et al. 2024
# use a constant SWAG lr below the peak); ensembles have 3 members (seeds s, s+1, s+2).
# Skips finished cells, so it can be run again to continue.
# Usage: bash benchmarks/bayes_lora.sh OUT_DIR TASK [SEED ...]    (e.g. runs/bayes obqa 0 1 2)
set -euo pipefail
OUT=${1:?OUT_DIR}; TASK=${2:?TASK}; shift 2
SEEDS=${*:-0}
UQ=${UQLORA:-.venv/bin/uqlora}
SAMPLES=${SAMPLES:-10}  # draws of swag and mc-dropout; multiswag takes MULTI_SAMPLES per member
MULTI_SAMPLES=${MULTI_SAMPLES:-5}
COMMON=(--model smollm2-135m --task "$TASK" --split train --max-examples 500 --epochs 3 --lr 3e-4 --batch-size 8 --quiet)
SWAG=(--swag-start 0.5 --swag-every 5 --swag-rank 20 --swa-lr 1e-4)
EVAL=(--task "$TASK" --split test --max-examples 500 --quiet)

train() {  # NAME SEED ARGS...: train OUT/TASK/NAME-seedSEED unless finished
  local run="$OUT/$TASK/$1-seed$2" seed=$2; shift 2
  [ -f "$run/train_summary.json" ] && return
  local resume=(); [ -d "$run" ] && resume=(--resume)
  if [ ${#resume[@]} -gt 0 ]; then
    /usr/bin/time -f "$run train (resumed): %e s" $UQ train --out "$run" --resume --quiet
  else
    /usr/bin/time -f "$run train: %e s" $UQ train "${COMMON[@]}" --seed "$seed" --out "$run" "$@"
  fi
}

evaluate() {  # RUN EVALDIR ARGS...
  local run=$1 dir=$2; shift 2
  [ -f "$run/eval/$dir/metrics.json" ] ||
    /usr/bin/time -f "$run eval $dir: %e s" $UQ evaluate "$run" "${EVAL[@]}" "$@"
}

for SEED in $SEEDS; do
  R="$OUT/$TASK"
  train map "$SEED" --method map
  evaluate "$R/map-seed$SEED" "$TASK"
  evaluate "$R/map-seed$SEED" "$TASK@mc-dropout" --method mc-dropout --samples "$SAMPLES"
  train swag "$SEED" --method swag "${SWAG[@]}"
  evaluate "$R/swag-seed$SEED" "$TASK" --samples "$SAMPLES"
  evaluate "$R/swag-seed$SEED" "$TASK@swa" --method swa
  train ensemble "$SEED" --method ensemble --members 3
  evaluate "$R/ensemble-seed$SEED" "$TASK"
  train multiswag "$SEED" --method multiswag --members 3 "${SWAG[@]}"
  evaluate "$R/multiswag-seed$SEED" "$TASK" --samples "$MULTI_SAMPLES"
done
$UQ compare "$OUT/$TASK"/*-seed* --task "$TASK" --out "$OUT/$TASK"
