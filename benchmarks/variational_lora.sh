#!/usr/bin/env bash
# BENCHMARKS.md "BLoB and C-LoRA" (issue 5): SmolLM2-135M, MAP vs BLoB vs C-LoRA (M = 0 and M = 10) vs C-LoRA
# without context, at the training budget of benchmarks/foundation.sh (500 training questions drawn with a fixed
# seed from the official train split, 3 epochs, lr 3e-4, batch 8, cloze; 500 test questions), each method with
# its documented defaults. MAP runs are shared with foundation.sh (MAP_ROOT/TASK/map-seedS).
# Skips finished cells, so it can be run again to continue.
# Usage: bash benchmarks/variational_lora.sh MAP_ROOT OUT_DIR TASK [SEED ...]
set -euo pipefail
MAP_ROOT=${1:?MAP_ROOT}; OUT=${2:?OUT_DIR}; TASK=${3:?TASK}; shift 3
SEEDS=${*:-0}
UQ=${UQLORA:-.venv/bin/uqlora}
COMMON=(--model smollm2-135m --task "$TASK" --split train --max-examples 500 --epochs 3 --lr 3e-4 --batch-size 8 --quiet)
EVAL=(--task "$TASK" --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"
R="$OUT/$TASK"

for SEED in $SEEDS; do
  MAP="$MAP_ROOT/$TASK/map-seed$SEED"
  train "$MAP" "$SEED" --method map
  evaluate "$MAP" "$TASK"
  train "$R/blob-seed$SEED" "$SEED" --method blob
  evaluate "$R/blob-seed$SEED" "$TASK" --samples 10
  evaluate "$R/blob-seed$SEED" "$TASK@blob-mean" --samples 0
  train "$R/clora-seed$SEED" "$SEED" --method clora
  evaluate "$R/clora-seed$SEED" "$TASK" --samples 10
  evaluate "$R/clora-seed$SEED" "$TASK@clora-mean" --samples 0
  train "$R/clora-nocontext-seed$SEED" "$SEED" --method clora --clora-context off
  evaluate "$R/clora-nocontext-seed$SEED" "$TASK" --samples 10
done
RUNS=(); for SEED in $SEEDS; do RUNS+=("$MAP_ROOT/$TASK/map-seed$SEED" "$R"/*-seed"$SEED"); done
$UQ compare "${RUNS[@]}" --task "$TASK" --out "$R" --aggregate
