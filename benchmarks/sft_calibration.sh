#!/usr/bin/env bash
# BENCHMARKS.md "Label-smoothed SFT: calibration before and after" (issue 7): instruction-tune SmolLM2-135M on
# LIMA with LoRA, label smoothing eps = 0 and eps = 0.1 (same data, same seed, same steps), then measure
# ACC/ECE/NLL/Brier of the model before SFT and of both SFT runs on ARC-C and MMLU (500 test questions each,
# drawn with a fixed seed; cloze framing, PROTOCOL.md's choice for this model).
# SFT: 256 LIMA conversations drawn with a fixed seed, truncated to 512 tokens and packed into 512-token rows,
# one epoch, batch 4 rows, LoRA r=8 on q/v, lr 5e-4 (the `uqlora sft` defaults otherwise). The budget is set by
# the 2-core CPU: one step (4 x 512 tokens, forward and backward) takes ~25 s there.
# Skips finished cells, so it can be run again to continue.
# Usage: bash benchmarks/sft_calibration.sh OUT_DIR [DATA]   (DATA: ../shared/data/sft/lima.json.gz)
set -euo pipefail
OUT=${1:?OUT_DIR}; DATA=${2:-../shared/data/sft/lima.json.gz}
UQ=${UQLORA:-.venv/bin/uqlora}
MODEL=${MODEL:-smollm2-135m}  # e.g. MODEL=gemma3-270m for a base (non-instruct) model
SFT=(--model "$MODEL" --data "$DATA" --max-examples 256 --max-length 512 --packing --epochs 1 --batch-size 4 --lr 5e-4
     --seed 0 --quiet)
TASKS=(arc-c mmlu)
EVAL=(--split test --max-examples 500 --quiet)

for TASK in "${TASKS[@]}"; do
  [ -f "$OUT/base/eval/$TASK/metrics.json" ] ||
    /usr/bin/time -f "base eval $TASK: %e s" $UQ evaluate --model "$MODEL" --out "$OUT/base" --task "$TASK" "${EVAL[@]}"
done
for EPS in 0 0.1; do
  RUN="$OUT/lima-ls$EPS"
  if [ ! -f "$RUN/train_summary.json" ]; then
    if [ -d "$RUN" ]; then
      /usr/bin/time -f "$RUN sft (resumed): %e s" $UQ sft --out "$RUN" --resume --quiet
    else
      /usr/bin/time -f "$RUN sft: %e s" $UQ sft "${SFT[@]}" --label-smoothing "$EPS" --out "$RUN"
    fi
  fi
  for TASK in "${TASKS[@]}"; do
    [ -f "$RUN/eval/$TASK/metrics.json" ] ||
      /usr/bin/time -f "$RUN eval $TASK: %e s" $UQ evaluate "$RUN" --task "$TASK" "${EVAL[@]}"
  done
done
for TASK in "${TASKS[@]}"; do
  $UQ compare "$OUT/base" "$OUT"/lima-ls* --task "$TASK" --out "$OUT/$TASK"
done
