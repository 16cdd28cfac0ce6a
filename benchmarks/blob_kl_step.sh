#!/usr/bin/env bash
# BENCHMARKS.md "BLoB's KL step": BLoB on OBQA seed 0 with its KL in the one AdamW objective (--blob-kl-lr 0, the
# former default) against the grid's BLoB run, whose KL takes its own SGD step (the default, the authors' scheme),
# and the grid's MAP run; settings of configs/smollm2-cpu-3ep.yaml (500 training questions, 3 epochs, bf16; 500 test
# questions, 10 draws, and the posterior mean). Skips finished cells.
# Usage: bash benchmarks/blob_kl_step.sh GRID_RUNS OUT   (GRID_RUNS: OUT/runs of configs/smollm2-cpu-3ep.yaml)
set -euo pipefail
GRID=${1:?GRID_RUNS}; OUT=${2:?OUT}
UQ=${UQLORA:-.venv/bin/uqlora}
COMMON=(--model smollm2-135m --task obqa --split train --max-examples 500 --epochs 3 --lr 3e-4 --batch-size 8
        --dtype bfloat16 --quiet)
EVAL=(--task obqa --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"

train "$OUT/blob-joint-kl" 0 --method blob --blob-kl-lr 0
evaluate "$OUT/blob-joint-kl" obqa --samples 10
evaluate "$OUT/blob-joint-kl" obqa@blob-mean --samples 0
RUNS=(); for R in "$GRID/obqa/map-seed0" "$GRID/obqa/blob-seed0" "$OUT/blob-joint-kl"; do
  compgen -G "$R/eval/obqa*/metrics.json" >/dev/null && RUNS+=("$R"); done
$UQ compare "${RUNS[@]}" --task obqa --out "$OUT"
