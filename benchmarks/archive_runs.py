"""Copy the text files of a benchmark's runs into the repository, so its tables survive the machine that made them.

What is copied, under DEST/TASK/RUN/ as in OUT/runs/: the runs' text files (config.yaml, train_summary.json,
train_log.jsonl, posterior/*.json, eval/*/metrics.json and predictions.jsonl with every question's
probabilities), enough to recompute every metric and to rewrite the report. No weights (adapter/, posteriors,
checkpoints) and no plots: they are large, and a run is remade from its config and seed. An unfinished training
(config.yaml but no train_summary.json: a sweep stopped during it) is left out and named: its text is no result,
and its checkpoint stays in OUT for `uqlora benchmark` to resume.

    .venv/bin/python benchmarks/archive_runs.py runs/benchmark/smollm2-cpu-3ep/runs benchmarks/results/smollm2-cpu-3ep

Copied back into OUT/runs, the archive makes `uqlora benchmark CONFIG --report-only` write the same report, and its
finished cells count as done. Its runs have no weights: a sweep whose remaining cells read one of them (an
evaluation, a post-hoc fit, a combined ensemble; a mix reads only its members' evaluations) names it and stops
before running anything; remove its folder, and the benchmark trains it again.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".txt"}


def unfinished_trainings(runs: Path) -> list[Path]:
    """The run folders (runs/TASK/RUN) whose training has not finished."""
    return sorted(run for run in runs.glob("*/*")
                  if (run / "config.yaml").is_file() and not (run / "train_summary.json").is_file())


def archive(runs: Path, dest: Path) -> tuple[int, list[Path]]:
    """Copy the text files of `runs`' finished runs into `dest`; returns how many, and the unfinished trainings
    left out."""
    left_out = unfinished_trainings(runs)
    left_out_names = {run.relative_to(runs).parts for run in left_out}  # (TASK, RUN)
    copied = 0
    for path in sorted(p for p in runs.rglob("*") if p.is_file()):
        rel = path.relative_to(runs)
        if path.suffix not in TEXT_SUFFIXES or {"checkpoint", "adapter"} & set(rel.parts) or path.name.startswith("."):
            continue
        if rel.parts[:2] in left_out_names:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied += 1
    return copied, left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the benchmark's OUT/runs folder")
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"error: {args.runs} is not a folder")
    copied, left_out = archive(args.runs, args.dest)
    for run in left_out:
        print(f"left out {run}: its training has not finished")
    print(f"{copied} files copied to {args.dest}")


if __name__ == "__main__":
    main()
