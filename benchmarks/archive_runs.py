"""Copy the text files of a benchmark's runs into the repository, so its tables survive the machine that made them.

What is copied, under DEST/TASK/RUN/ as in OUT/runs/: the runs' text files (config.yaml, train_summary.json,
train_log.jsonl, posterior/*.json, eval/*/metrics.json and predictions.jsonl with every question's
probabilities), enough to recompute every metric and to rewrite the report. No weights (adapter/, posteriors,
checkpoints) and no plots: they are large, and a run is remade from its config and seed.

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


def archive(runs: Path, dest: Path) -> int:
    """Copy the text files of `runs` into `dest`; returns how many."""
    copied = 0
    for path in sorted(p for p in runs.rglob("*") if p.is_file()):
        rel = path.relative_to(runs)
        if path.suffix not in TEXT_SUFFIXES or {"checkpoint", "adapter"} & set(rel.parts) or path.name.startswith("."):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied += 1
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the benchmark's OUT/runs folder")
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"error: {args.runs} is not a folder")
    print(f"{archive(args.runs, args.dest)} files copied to {args.dest}")


if __name__ == "__main__":
    main()
