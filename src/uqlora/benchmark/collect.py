"""What the finished cells of a benchmark measured: metrics (aggregated over seeds by `compare.aggregate`, the
code behind `uqlora compare --aggregate`), OOD detection (`evaluation.ood.ood_report`), pooled predictions, costs.

Costs of a method's run, from what the commands record:
  train seconds   Σ train_summary.json epoch_seconds (checkpoints carry the finished epochs' seconds and the
                  current epoch's so far, so a resumed run records every epoch; runs made before that record only
                  the epochs after the resume: their mean × epochs, an estimate); post-hoc: the base
                  run's + the fit's seconds; combine, mix: Σ members;
  predict seconds metrics.json seconds / n (the prediction loop, without loading the model; a mix: its members'
                  added up; a Laplace link that reused the other link's logit Gaussians adds what they had cost,
                  reused_logit_gaussian_seconds);
  peak memory     peak_memory_bytes of train_summary.json, the fit's posterior/METHOD.json and metrics.json
                  (post-hoc: max of training and fit; combine, mix: max over members); absent in older runs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runs
from ..errors import UqloraError
from ..evaluation.compare import SCORES, aggregate
from ..evaluation.ood import ood_report
from .config import Benchmark
from .plan import Cell, plan, predictive_suffix, run_dir

IN_DISTRIBUTION, SHIFT = "in-distribution", "shift"
OOD_SCORES = ("entropy", "mutual_information")
# the seconds a post-hoc fit records in posterior/METHOD.json (laplace: K-FAC factors, then the prior)
FIT_SECONDS = {"laplace": ("fit_seconds", "prior_seconds"), "laplace-ll": ("fit_seconds", "prior_seconds"),
               "temperature": ("seconds",), "swag-scale": ("seconds",)}


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation cell and its metrics.json."""

    setting: str  # in-distribution | shift
    cell: Cell
    metrics: dict


@dataclass(frozen=True)
class Cost:
    seconds: float | None
    peak_bytes: int | None
    measure: str | None  # how the peak was measured (memory.py); peaks are compared only within one measure


def evaluations(bench: Benchmark) -> tuple[list[Evaluation], list[Cell]]:
    """The finished evaluations (in plan order) and the evaluation cells still missing, of the grid's seeds (not
    the evaluations of ensemble members beyond them, which only their mix reads)."""
    found, missing = [], []
    for cell in plan(bench):
        if cell.step != "evaluate" or cell.seed not in bench.seeds:
            continue
        path = cell.result / "metrics.json"
        if not path.is_file():
            missing.append(cell)
            continue
        setting = IN_DISTRIBUTION if cell.eval_task == cell.task else SHIFT
        found.append(Evaluation(setting, cell, _read_json(path)))
    return found, missing


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UqloraError(f"{path} is not valid JSON: {err}") from None


def aggregated(evals: list[Evaluation], setting: str) -> dict[tuple[str, str], dict]:
    """(method, eval task) -> mean and sample std over seeds of each score, as `uqlora compare --aggregate`."""
    rows = [{"run": str(e.cell.run), "method": e.cell.method, "task": e.cell.eval_task,
             **{k: e.metrics[k] for k in ("n", *SCORES)}} for e in evals if e.setting == setting]
    return {(row["method"], row["task"]): row for row in aggregate(rows)}


def pooled_predictions(evals: list[Evaluation]) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions.jsonl of `evals` concatenated: probs [N, C_max] (0 for absent choices), labels [N]."""
    rows = []
    for e in evals:
        path = e.cell.result / "predictions.jsonl"
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    width = max(len(r["probs"]) for r in rows)
    probs = torch.tensor([r["probs"] + [0.0] * (width - len(r["probs"])) for r in rows], dtype=torch.float64)
    return probs, torch.tensor([r["label"] for r in rows])


def ood_results(bench: Benchmark, evals: list[Evaluation]) -> list[dict]:
    """One row per (method, seed, OOD task, score) with AUROC and AUPR: the in-distribution test questions of
    shift.train_task are the negatives, the OOD task's the positives; only where both evaluations finished."""
    done = {(e.cell.method, e.cell.seed, e.cell.eval_task) for e in evals if e.cell.task == bench.shift.train_task}
    rows = []
    for name in bench.methods:
        predictive = predictive_suffix(bench, name)
        for seed in bench.seeds:
            if (name, seed, bench.shift.train_task) not in done:
                continue
            tasks = [t for t in bench.shift.eval_tasks if (name, seed, t) in done]
            run = run_dir(bench, name, bench.shift.train_task, seed)
            report = ood_report(run, bench.shift.train_task, tasks, bench.eval["split"], predictive) if tasks else None
            for task in tasks:
                for score, value in report["ood"][task]["scores"].items():
                    if score in OOD_SCORES:
                        rows.append({"method": name, "seed": seed, "ood_task": task, "score": score, **value})
    return rows


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std — 0 for one value —, count), as compare.aggregate computes them."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


# -- costs ------------------------------------------------------------------------------------------------

def train_cost(bench: Benchmark, name: str, task: str, seed: int) -> Cost:
    """What making entry `name`'s run cost (see the module doc); None parts where a record is missing."""
    spec = bench.methods[name]
    if spec.kind == "reuse":
        return train_cost(bench, spec.base, task, seed)
    if spec.kind in ("combine", "mix"):
        return _merge([train_cost(bench, spec.base, task, seed + m) for m in range(spec.members)])
    run = run_dir(bench, name, task, seed)
    if spec.kind == "posthoc":
        record = _optional_json(run / runs.POSTERIOR / f"{spec.method}.json")
        keys = FIT_SECONDS[spec.method]
        seconds = sum(record[k] for k in keys) if all(k in record for k in keys) else None
        return _merge([train_cost(bench, spec.base, task, seed), _peak(seconds, record)])
    summary = _optional_json(run / runs.SUMMARY)
    epochs = summary.get("epoch_seconds")
    seconds = None
    if epochs:
        seconds = sum(epochs) * max(1.0, summary.get("epochs", len(epochs)) / len(epochs))
    return _peak(seconds, summary)


def predict_cost(metrics: dict) -> Cost:
    """Seconds per question of the prediction loop and its peak memory (metrics.json). A Laplace evaluation that
    read its logit Gaussians back from the other link's counts what computing them had cost, as if it had."""
    seconds = None
    if "seconds" in metrics and metrics.get("n"):
        seconds = (metrics["seconds"] + metrics.get("reused_logit_gaussian_seconds", 0.0)) / metrics["n"]
    return _peak(seconds, metrics)


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def _peak(seconds: float | None, record: dict) -> Cost:
    return Cost(seconds, record.get("peak_memory_bytes"), record.get("peak_memory_measure"))


def _merge(costs: list[Cost]) -> Cost:
    """Work done one part after another: seconds add up, the peak is the largest (one measure, else unknown)."""
    seconds = None if any(c.seconds is None for c in costs) else sum(c.seconds for c in costs)
    measures = {c.measure for c in costs}
    if any(c.peak_bytes is None for c in costs) or len(measures) > 1:
        return Cost(seconds, None, None)
    return Cost(seconds, max(c.peak_bytes for c in costs), measures.pop())
