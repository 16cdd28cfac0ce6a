"""Out-of-distribution detection from predictive uncertainty: AUROC and AUPR of an uncertainty score that
separates a run's own (in-distribution) task from other tasks, read from RUN/eval/TASK/predictions.jsonl.

Convention: the positives are the OOD questions and a score is an uncertainty, higher meaning "more likely OOD".
Scores (per question, from the predictive p̄ written by `uqlora evaluate`):
  entropy             predictive entropy H[p̄] as written by evaluate;
  mutual_information  the epistemic part H[p̄] − E_θ H[p(·|θ)], only for methods that drew more than one sample;
  max_prob            1 − max_c p̄_c, one minus the top-1 confidence (Hendrycks & Gimpel, 2017).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from uqlora.errors import UqloraError
from uqlora.io import write_json, write_text
from uqlora.runs import eval_dir

SCORES = ("entropy", "mutual_information", "max_prob")
MI = "mutual_information"


def _scores(values, name: str) -> np.ndarray:
    """`values` as a non-empty 1-D float64 array of finite numbers, else UqloraError naming `name`."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise UqloraError(f"{name} must be a non-empty 1-D sequence of scores, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise UqloraError(f"{name} holds a non-finite score at index {int(np.flatnonzero(~np.isfinite(arr))[0])}.")
    return arr


def auroc(scores_neg, scores_pos) -> float:
    """Area under the ROC curve = the Mann-Whitney statistic U / (n_neg·n_pos), U = Σ_{pos p, neg q}
    [s_p > s_q] + ½[s_p = s_q]: the probability that a random positive outscores a random negative, ties ½."""
    neg, pos = np.sort(_scores(scores_neg, "scores_neg")), _scores(scores_pos, "scores_pos")
    below = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (neg.size * pos.size))


def aupr(scores_neg, scores_pos) -> float:
    """Average precision (sklearn's `average_precision_score`): AP = Σ_n (R_n − R_{n−1}) P_n, with thresholds
    t_n at the distinct scores in decreasing order, "positive" meaning score ≥ t_n, R_0 = 0."""
    neg, pos = _scores(scores_neg, "scores_neg"), _scores(scores_pos, "scores_pos")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    thresholds, inverse = np.unique(-scores, return_inverse=True)  # ascending in −score = descending in score
    tp = np.cumsum(np.bincount(inverse, weights=is_pos, minlength=thresholds.size))
    flagged = np.cumsum(np.bincount(inverse, minlength=thresholds.size))
    recall, precision = tp / pos.size, tp / flagged
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def evaluate_command(run_dir, task: str, split: str) -> str:
    """The `uqlora evaluate` command line that writes the predictions of `task` for `run_dir`."""
    return f"uqlora evaluate {run_dir} --task {task}" + ("" if split == "test" else f" --split {split}")


def _number(row: dict, key: str, where: str) -> float:
    """row[key] as a finite float; UqloraError naming `where` (file and line) otherwise."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UqloraError(f"{where}: `{key}` must be a number, got {json.dumps(value)}.")
    if not math.isfinite(value):
        raise UqloraError(f"{where}: `{key}` is not finite ({value}).")
    return float(value)


def _row_scores(line: str, where: str) -> dict[str, float]:
    """The scores of one predictions.jsonl line (mutual_information only when the line has it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UqloraError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise UqloraError(f"{where} must hold a JSON object, got {type(row).__name__}.")
    probs = row.get("probs")
    if not isinstance(probs, list) or not probs:
        raise UqloraError(f"{where}: `probs` must be a non-empty list of probabilities, got {json.dumps(probs)}.")
    top = max(_number({"probs": p}, "probs", where) for p in probs)
    out = {"entropy": _number(row, "entropy", where), "max_prob": 1.0 - top}
    if MI in row:
        out[MI] = _number(row, MI, where)
    return out


def read_scores(run_dir, task: str, split: str = "test", predictive: str | None = None) -> dict[str, np.ndarray]:
    """Per-question scores of RUN/eval/TASK/predictions.jsonl (RUN/eval/TASK@PREDICTIVE with `predictive`, another
    predictive of the run: `evaluate --method`), {score name: [N] float64}; mutual_information only when every
    line has it (a file with it on some lines only is malformed)."""
    path = eval_dir(Path(run_dir), task, split, predictive) / "predictions.jsonl"
    if not path.is_file():
        raise UqloraError(f"{path} does not exist: run `{evaluate_command(run_dir, task, split)}` first.")
    rows = [_row_scores(line, f"{path} line {i}")
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    if not rows:
        raise UqloraError(f"{path} holds no predictions: run `{evaluate_command(run_dir, task, split)}` again.")
    with_mi = [MI in r for r in rows]
    if any(with_mi) and not all(with_mi):
        raise UqloraError(f"{path} line {with_mi.index(not with_mi[0]) + 1}: `{MI}` is "
                          f"{'missing' if with_mi[0] else 'present'}, unlike on line 1.")
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in SCORES if k in rows[0]}


def ood_report(run_dir, in_task: str, ood_tasks, split: str = "test", predictive: str | None = None) -> dict:
    """AUROC and AUPR of each available score for telling each OOD task's questions (positives) from
    in_task's (negatives): {"run", "in_task", "split", "ood": {task: {"n_in", "n_ood", "scores":
    {score: {"auroc", "aupr"}}}}}; mutual_information appears only when both files have it. `predictive`
    reads the evaluations of another predictive of the run (eval/TASK@PREDICTIVE, see read_scores)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UqloraError(f"run directory {run_dir} does not exist.")
    ood_tasks = list(ood_tasks)
    if not ood_tasks:
        raise UqloraError("no OOD task given: name at least one task other than the in-distribution one.")
    if in_task in ood_tasks or len(set(ood_tasks)) < len(ood_tasks):
        raise UqloraError(f"the OOD tasks {ood_tasks} must be distinct and differ from the in-task {in_task}.")
    neg = read_scores(run_dir, in_task, split, predictive)
    report = {"run": run_dir.name, "in_task": in_task, "split": split, "ood": {}}
    for task in ood_tasks:
        pos = read_scores(run_dir, task, split, predictive)
        names = [k for k in SCORES if k in neg and k in pos]
        report["ood"][task] = {
            "n_in": len(neg["entropy"]), "n_ood": len(pos["entropy"]),
            "scores": {k: {"auroc": auroc(neg[k], pos[k]), "aupr": aupr(neg[k], pos[k])} for k in names}}
    return report


def table_rows(report: dict) -> list[list[str]]:
    """Header and one row per (OOD task, score): AUROC and AUPR as percentages with 1 decimal."""
    rows = [["ood task", "n_in", "n_ood", "score", "AUROC (%)", "AUPR (%)"]]
    for task, res in report["ood"].items():
        for name, value in res["scores"].items():
            rows.append([task, str(res["n_in"]), str(res["n_ood"]), name,
                         f"{100 * value['auroc']:.1f}", f"{100 * value['aupr']:.1f}"])
    return rows


def to_markdown(report: dict) -> str:
    """A GitHub Markdown table of `table_rows`; text columns left-aligned, numbers right-aligned."""
    header, *body = table_rows(report)
    align = [":---", "---:", "---:", ":---", "---:", "---:"]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [header, align, *body])


def print_table(report: dict, file=None) -> None:
    """Print `table_rows` aligned in columns to `file` (default stdout)."""
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=file or sys.stdout)


def write_ood_report(report: dict, run_dir) -> tuple[Path, Path]:
    """Write RUN/eval/ood-<IN>.json and .md atomically, <IN> being the in-task's eval folder name (eval_dir:
    ':' and '/' become '-', a split other than test is appended); return their paths."""
    stem = "ood-" + eval_dir(Path(run_dir), report["in_task"], report["split"]).name
    json_path, md_path = Path(run_dir) / "eval" / f"{stem}.json", Path(run_dir) / "eval" / f"{stem}.md"
    write_json(json_path, report)
    write_text(md_path, to_markdown(report))
    return json_path, md_path
