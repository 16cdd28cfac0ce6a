#!/usr/bin/env bash
# BENCHMARKS.md "SWAG family": SmolLM2-135M, MAP vs MC dropout vs SWA vs SWAG vs deep ensemble vs MultiSWAG at
# the `cpu` scale of PROTOCOL.md and the training budget of benchmarks/foundation.sh (500 training questions
# drawn with a fixed seed from the official train split, 3 epochs, lr 3e-4, batch 8; 500 test questions).
# SWA/SWAG collect every 5 steps over the second half of training at a constant lr of 1e-4 (Onal et al. 2024
# use a constant SWAG lr below the peak). Ensembles have 3 members: the ensemble (MultiSWAG) of seed s is
# `uqlora combine` of the map (swag) runs with seeds s, s+1, s+2 -- exactly what `train --method ensemble
# --seed s --members 3` trains -- so seeds 0 1 2 need single runs of seeds 0..4, and the ensembles of
# neighbouring seeds share members (their spread understates the seed-to-seed variation).
# MAP runs are shared with benchmarks/foundation.sh (MAP_ROOT/TASK/map-seedS; trained here if missing).
# Skips finished cells, so it can be run again to continue.
# Usage: bash benchmarks/bayes_lora.sh MAP_ROOT OUT_DIR TASK [SEED ...]   (e.g. runs/foundation runs/bayes obqa 0 1 2)
set -euo pipefail
MAP_ROOT=${1:?MAP_ROOT}; OUT=${2:?OUT_DIR}; TASK=${3:?TASK}; shift 3
SEEDS=${*:-0}
UQ=${UQLORA:-.venv/bin/uqlora}
SAMPLES=${SAMPLES:-10}  # draws of swag and mc-dropout; multiswag takes MULTI_SAMPLES per member
MULTI_SAMPLES=${MULTI_SAMPLES:-5}
MEMBERS=3
COMMON=(--model smollm2-135m --task "$TASK" --split train --max-examples 500 --epochs 3 --lr 3e-4 --batch-size 8 --quiet)
SWAG=(--swag-start 0.5 --swag-every 5 --swag-rank 20 --swa-lr 1e-4)
EVAL=(--task "$TASK" --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"
R="$OUT/$TASK"

combine() {  # METHOD FIRST_SEED KIND: KIND runs of seeds FIRST..FIRST+MEMBERS-1 -> R/METHOD-seedFIRST
  local out="$R/$1-seed$2" members=()
  [ -f "$out/config.yaml" ] && return
  for ((m = $2; m < $2 + MEMBERS; m++)); do
    if [ "$3" = map ]; then members+=("$MAP_ROOT/$TASK/map-seed$m"); else members+=("$R/swag-seed$m"); fi
  done
  $UQ combine "${members[@]}" --out "$out"
}

for SEED in $SEEDS; do
  MAP="$MAP_ROOT/$TASK/map-seed$SEED"
  train "$MAP" "$SEED" --method map
  evaluate "$MAP" "$TASK"
  evaluate "$MAP" "$TASK@mc-dropout" --method mc-dropout --samples "$SAMPLES"
  train "$R/swag-seed$SEED" "$SEED" --method swag "${SWAG[@]}"
  evaluate "$R/swag-seed$SEED" "$TASK" --samples "$SAMPLES"
  evaluate "$R/swag-seed$SEED" "$TASK@swa" --method swa
done
for SEED in $SEEDS; do
  for ((m = SEED; m < SEED + MEMBERS; m++)); do
    train "$MAP_ROOT/$TASK/map-seed$m" "$m" --method map
    train "$R/swag-seed$m" "$m" --method swag "${SWAG[@]}"
  done
  combine ensemble "$SEED" map
  evaluate "$R/ensemble-seed$SEED" "$TASK"
  combine multiswag "$SEED" swag
  evaluate "$R/multiswag-seed$SEED" "$TASK" --samples "$MULTI_SAMPLES"
done
RUNS=(); for SEED in $SEEDS; do RUNS+=("$MAP_ROOT/$TASK/map-seed$SEED" "$R"/*-seed"$SEED"); done
$UQ compare "${RUNS[@]}" --task "$TASK" --out "$R" --aggregate
