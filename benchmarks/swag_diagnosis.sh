#!/usr/bin/env bash
# BENCHMARKS.md "SWAG: why the direction is weak": the three suspects of issue 3 on OBQA seed 0 (500 training
# questions, 500 test questions, bf16 as configs/smollm2-cpu-3ep.yaml), each against the grid's settings (3 epochs,
# collection every 5 steps over the second half at a constant lr of 1e-4):
#   schedule + window: 10 epochs, collection every 16 steps over the last 5 epochs (20 snapshots, K = 20) at a
#                      constant lr equal to the training peak (3e-4): a longer, stationary phase at a larger lr;
#   sample scale:      that run's draws at --swag-scale 1, 4 and 16 (4 and 16 in copies of the run, as each
#                      scale needs its own eval folder);
#   budget:            MAP trained 10 epochs (is MAP itself more overconfident with more steps?);
#   window alone:      10 epochs with the grid's collection (every 5 steps over the second half at 1e-4), at
#                      scales 1 and 16: is it the longer training or the collection at the peak lr?
#   scale alone:       the grid's own 3-epoch SWAG run at scale 16 (a copy of it);
#   scale by val:      the 10-epoch run's scale chosen by validation NLL (`posthoc --method swag-scale`).
# The grid's own MAP and SWAG runs of OBQA seed 0 are read from GRID (uqlora benchmark configs/smollm2-cpu-3ep.yaml).
# Skips finished cells; PARTS below. Usage: bash benchmarks/swag_diagnosis.sh GRID_RUNS OUT   (GRID_RUNS: OUT/runs of the grid)
set -euo pipefail
GRID=${1:?GRID_RUNS}; OUT=${2:?OUT}
UQ=${UQLORA:-.venv/bin/uqlora}
SAMPLES=${SAMPLES:-10}
COMMON=(--model smollm2-135m --task obqa --split train --max-examples 500 --lr 3e-4 --batch-size 8 --dtype bfloat16
        --quiet)
EVAL=(--task obqa --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"

PARTS=${PARTS:-swag map window scale val}  # run only some parts, e.g. one per core: PARTS=swag ... & PARTS=map ...

if [[ " $PARTS " == *" swag "* ]]; then
  train "$OUT/swag-10ep" 0 --method swag --epochs 10 --swag-start 0.5 --swag-every 16 --swag-rank 20 --swa-lr 3e-4
  evaluate "$OUT/swag-10ep" obqa@swa --method swa
  evaluate "$OUT/swag-10ep" obqa --samples "$SAMPLES" --swag-scale 1
  for SCALE in 4 16; do
    RUN="$OUT/swag-10ep-scale$SCALE"
    [ -d "$RUN" ] || { mkdir -p "$RUN"; cp -r "$OUT/swag-10ep/." "$RUN/"; rm -rf "$RUN/eval"; }
    evaluate "$RUN" obqa --samples "$SAMPLES" --swag-scale "$SCALE"
  done
fi
if [[ " $PARTS " == *" map "* ]]; then
  train "$OUT/map-10ep" 0 --method map --epochs 10
  evaluate "$OUT/map-10ep" obqa
fi
if [[ " $PARTS " == *" window "* ]]; then
  train "$OUT/swag-10ep-gridwindow" 0 --method swag --epochs 10 --swag-start 0.5 --swag-every 5 --swag-rank 20 \
    --swa-lr 1e-4
  evaluate "$OUT/swag-10ep-gridwindow" obqa --samples "$SAMPLES" --swag-scale 1
  RUN="$OUT/swag-10ep-gridwindow-scale16"
  [ -d "$RUN" ] || { mkdir -p "$RUN"; cp -r "$OUT/swag-10ep-gridwindow/." "$RUN/"; rm -rf "$RUN/eval"; }
  evaluate "$RUN" obqa --samples "$SAMPLES" --swag-scale 16
fi
if [[ " $PARTS " == *" scale "* ]]; then
  RUN="$OUT/swag-seed0-scale16"
  [ -d "$RUN" ] || { mkdir -p "$RUN"; cp -r "$GRID/obqa/swag-seed0/." "$RUN/"; rm -rf "$RUN/eval"; }
  evaluate "$RUN" obqa --samples "$SAMPLES" --swag-scale 16
fi
if [[ " $PARTS " == *" val "* ]]; then
  [ -f "$OUT/swag-10ep-val/posterior/swag-scale.json" ] || { rm -rf "$OUT/swag-10ep-val";
    $UQ posthoc "$OUT/swag-10ep" --method swag-scale --out "$OUT/swag-10ep-val" --quiet; }
  evaluate "$OUT/swag-10ep-val" obqa
fi
RUNS=(); for R in "$GRID/obqa/map-seed0" "$GRID/obqa/swag-seed0" "$OUT"/map-10ep "$OUT"/swag-*; do
  [ -f "$R/eval/obqa/metrics.json" ] && RUNS+=("$R"); done  # with their other predictives (eval/obqa@...)
$UQ compare "${RUNS[@]}" --task obqa --out "$OUT"
