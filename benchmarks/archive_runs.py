"""Copy the small files of a benchmark's runs into the repository, so its tables survive the machine that made them.

What is copied, under DEST/TASK/RUN/ as in OUT/runs/: every file of at most --max-mib MiB (config.yaml,
train_summary.json, train_log.jsonl, the adapters, posterior/*.json and the small posteriors, eval/*/metrics.json,
predictions.jsonl with every question's probabilities, ...), but no checkpoint/ (a finished run's resume state) and
no plots. Larger files (the full Laplace factors, SWAG states) are listed in DEST/LEFT_OUT.txt with their sizes.

    .venv/bin/python benchmarks/archive_runs.py runs/benchmark/smollm2-cpu/runs benchmarks/results/smollm2-cpu

Copied back into OUT/runs, the archive makes `uqlora benchmark CONFIG --report-only` write the same report, and
its finished cells count as done; a run whose large files were left out can still be evaluated only if it needs
none of them (remove its folder to make it again).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SKIPPED_DIRS = {"checkpoint"}
SKIPPED_SUFFIXES = {".png"}


def archive(runs: Path, dest: Path, max_bytes: int) -> tuple[int, list[str]]:
    """Copy; returns (files copied, 'path size' lines of the files left out for their size)."""
    copied, left_out = 0, []
    for path in sorted(p for p in runs.rglob("*") if p.is_file()):
        rel = path.relative_to(runs)
        if SKIPPED_DIRS & set(rel.parts[:-1]) or path.suffix in SKIPPED_SUFFIXES or path.name.startswith("."):
            continue
        if path.stat().st_size > max_bytes:
            left_out.append(f"{rel} {path.stat().st_size / 2**20:.1f} MiB")
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied += 1
    return copied, left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the benchmark's OUT/runs folder")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--max-mib", type=float, default=4.0, help="largest file copied (default 4 MiB)")
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"error: {args.runs} is not a folder")
    copied, left_out = archive(args.runs, args.dest, int(args.max_mib * 2**20))
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "LEFT_OUT.txt").write_text("".join(line + "\n" for line in left_out))
    print(f"{copied} files copied to {args.dest}; {len(left_out)} larger than {args.max_mib} MiB left out "
          f"({args.dest / 'LEFT_OUT.txt'})")


if __name__ == "__main__":
    main()
