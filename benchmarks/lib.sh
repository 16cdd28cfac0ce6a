# Shared by the benchmark scripts (sourced): train and evaluate cells that skip what is finished.
# The caller sets UQ (the uqlora command), COMMON (train flags) and EVAL (evaluate flags).

train() {  # RUN SEED ARGS...: train RUN unless finished (resumed if it was interrupted)
  local run=$1 seed=$2; shift 2
  [ -f "$run/train_summary.json" ] && return
  if [ -d "$run" ]; then
    /usr/bin/time -f "$run train (resumed): %e s" $UQ train --out "$run" --resume --quiet
  else
    /usr/bin/time -f "$run train: %e s" $UQ train "${COMMON[@]}" --seed "$seed" --out "$run" "$@"
  fi
}

evaluate() {  # RUN EVALDIR ARGS...: evaluate RUN unless RUN/eval/EVALDIR/metrics.json exists
  local run=$1 dir=$2; shift 2
  [ -f "$run/eval/$dir/metrics.json" ] ||
    /usr/bin/time -f "$run eval $dir: %e s" $UQ evaluate "$run" "${EVAL[@]}" "$@"
}
