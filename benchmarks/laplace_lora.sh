#!/usr/bin/env bash
# BENCHMARKS.md "Laplace-LoRA and temperature scaling": post-hoc posteriors of the MAP runs of
# benchmarks/foundation.sh (SmolLM2-135M, 500 training questions, 3 epochs, cloze; 500 test questions):
# MAP vs temperature vs laplace-ll vs laplace (probit, and mc with MC_DRAWS logit draws, 1000 by default: the
# draws are cheap next to the Jacobians, and 10 nearly one-hot draws estimate E[softmax] too coarsely), each with the defaults
# (fisher curvature, prior precision by the Laplace evidence; temperature on 200 unused training questions).
# Skips finished cells, so it can be run again to continue. LINKS="probit" skips the mc evaluations.
# Usage: bash benchmarks/laplace_lora.sh MAP_ROOT OUT TASK [SEED ...]   (MAP runs: MAP_ROOT/TASK/map-seedS)
set -euo pipefail
MAP_ROOT=${1:?MAP_ROOT}; OUT=${2:?OUT}; TASK=${3:?TASK}; shift 3
SEEDS=${*:-0}
UQ=${UQLORA:-.venv/bin/uqlora}
LINKS=${LINKS:-probit mc}
EVAL=(--task "$TASK" --split test --max-examples 500 --quiet)
source "$(dirname "$0")/lib.sh"

posthoc() {  # MAP METHOD RUN
  [ -f "$3/config.yaml" ] || /usr/bin/time -f "$3 fit: %e s" $UQ posthoc "$1" --method "$2" --out "$3" --quiet
}

for SEED in $SEEDS; do
  MAP="$MAP_ROOT/$TASK/map-seed$SEED"
  R="$OUT/$TASK"
  [ -f "$MAP/train_summary.json" ] || { echo "missing MAP run $MAP: run benchmarks/foundation.sh first" >&2; exit 2; }
  evaluate "$MAP" "$TASK"
  posthoc "$MAP" temperature "$R/temperature-seed$SEED"
  evaluate "$R/temperature-seed$SEED" "$TASK"
  posthoc "$MAP" laplace-ll "$R/laplace-ll-seed$SEED"
  evaluate "$R/laplace-ll-seed$SEED" "$TASK"
  posthoc "$MAP" laplace "$R/laplace-seed$SEED"
  evaluate "$R/laplace-seed$SEED" "$TASK"
  if [[ " $LINKS " == *" mc "* ]]; then
    evaluate "$R/laplace-seed$SEED" "$TASK@laplace-mc" --link mc --samples "${MC_DRAWS:-1000}"
  fi
done
RUNS=(); for SEED in $SEEDS; do RUNS+=("$MAP_ROOT/$TASK/map-seed$SEED" "$R"/*-seed"$SEED"); done
$UQ compare "${RUNS[@]}" --task "$TASK" --out "$R" --aggregate
