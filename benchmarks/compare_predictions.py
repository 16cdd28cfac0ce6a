"""Two evaluations of the same questions side by side: the difference of each metric, the largest difference of a
probability, how many questions the two answer differently, and each one's mean top probability.

    .venv/bin/python benchmarks/compare_predictions.py EVAL_DIR_A EVAL_DIR_B
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("accuracy", "ece", "nll", "brier", "mean_entropy", "mean_mutual_information")


def read(folder: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return metrics, rows


def answer(row: dict) -> int:
    return max(range(len(row["probs"])), key=row["probs"].__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    (ma, ra), (mb, rb) = read(args.a), read(args.b)
    if [r["id"] for r in ra] != [r["id"] for r in rb]:
        raise SystemExit("error: the two evaluations hold different questions")
    for key in (k for k in METRICS if k in ma and k in mb):
        print(f"{key:24s} {ma[key]:.6f} {mb[key]:.6f} |diff| {abs(ma[key] - mb[key]):.2e}")
    largest = max(abs(p - q) for x, y in zip(ra, rb) for p, q in zip(x["probs"], y["probs"]))
    differ = [i for i, (x, y) in enumerate(zip(ra, rb)) if answer(x) != answer(y)]
    print(f"largest probability difference {largest:.2e}")
    print(f"questions answered differently {len(differ)} of {len(ra)}")
    for name, rows in (("a", ra), ("b", rb)):
        top = sum(max(r["probs"]) for r in rows) / len(rows)
        on_differ = sum(max(rows[i]["probs"]) for i in differ) / len(differ) if differ else float("nan")
        print(f"mean top probability {name}: {top:.3f} (on the questions answered differently: {on_differ:.3f})")


if __name__ == "__main__":
    main()
