#!/usr/bin/env bash
# BENCHMARKS.md "Foundation": SmolLM2-135M zero-shot vs MAP-LoRA on OBQA, ARC-E, ARC-C (scale `cpu` of
# PROTOCOL.md: 500 training questions drawn with a fixed seed from the official train split, 500 test
# questions, cloze framing). Usage: bash benchmarks/foundation.sh OUT_DIR [SEED ...]
set -euo pipefail
OUT=${1:-runs/foundation}; shift || true
SEEDS=${*:-0}
UQ=${UQLORA:-.venv/bin/uqlora}
for TASK in obqa arc-e arc-c; do
  [ -f "$OUT/$TASK/zero-shot/eval/$TASK/metrics.json" ] ||
    /usr/bin/time -f "$TASK zero-shot eval: %e s" $UQ evaluate --model smollm2-135m --out "$OUT/$TASK/zero-shot" \
      --task "$TASK" --split test --max-examples 500 --quiet
  for SEED in $SEEDS; do
    RUN="$OUT/$TASK/map-seed$SEED"
    [ -d "$RUN/adapter" ] ||
      /usr/bin/time -f "$TASK map seed $SEED train: %e s" $UQ train --model smollm2-135m --task "$TASK" \
        --split train --max-examples 500 --method map --epochs 3 --lr 3e-4 --batch-size 8 --seed "$SEED" \
        --out "$RUN" --quiet
    [ -f "$RUN/eval/$TASK/metrics.json" ] ||
      /usr/bin/time -f "$TASK map seed $SEED eval: %e s" $UQ evaluate "$RUN" --task "$TASK" --split test \
        --max-examples 500 --quiet
  done
done
$UQ compare "$OUT"/*/* --out "$OUT"
