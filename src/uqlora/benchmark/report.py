"""The report folder OUT/report/ of a benchmark (docs/benchmark.md):

    report.md            every table below, the settings and the scale, missing evaluations
    in_distribution.csv  methods as rows, tasks as column groups: ACC/ECE/NLL/Brier mean and std over seeds
    shift.csv            the same for the shift: runs trained on shift.train_task evaluated on shift.eval_tasks
    results.csv          long form: one row per method × task × seed (both settings), with the costs
    ood.csv              AUROC/AUPR of entropy and mutual information per method, seed and OOD task
    cost.csv             train time, predict time per question and peak memory as ratios to MAP
    reliability.png      reliability diagrams, methods × tasks, the seeds pooled

Percentages (ACC, ECE, AUROC, AUPR) show one decimal and NLL/Brier three, as `uqlora compare`; a value with a
`*` has fewer seeds than the benchmark lists (its evaluations are listed as missing).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import UqloraError
from ..evaluation.compare import PERCENT
from ..io import write_text
from .collect import (IN_DISTRIBUTION, OOD_SCORES, SHIFT, Evaluation, aggregated, evaluations, mean_std,
                      ood_results, pooled_predictions, predict_cost, train_cost)
from .config import Benchmark
from .figure import reliability_grid
from .plan import task_folder

TABLE_METRICS = {"accuracy": "ACC (%)", "ece": "ECE (%)", "nll": "NLL", "brier": "Brier"}
OOD_LABELS = {"entropy": "entropy", "mutual_information": "MI"}
COSTS = {"train_seconds": "train time", "predict_seconds": "predict time / question",
         "train_peak": "peak memory, train", "predict_peak": "peak memory, predict"}
LONG_COLUMNS = ("setting", "method", "train_task", "eval_task", "seed", "n", "n_samples", "accuracy", "ece", "nll",
                "brier", "rms_ce", "train_seconds", "train_peak_bytes", "predict_seconds_per_question",
                "predict_peak_bytes", "peak_memory_measure", "eval_folder")
MIB = 2**20
MISSING = "–"


def write_report(bench: Benchmark) -> Path:
    """Write OUT/REPORT/ (REPORT: the config's `report`, default report) from the finished evaluations; returns the
    folder."""
    evals, missing = evaluations(bench)
    if not evals:
        raise UqloraError(f"nothing to report: no evaluation of {bench.path} has finished yet")
    out = bench.out / bench.report
    methods = list(bench.methods)
    parts = [_header(bench), _scores_part(bench, evals, IN_DISTRIBUTION, out)]
    if bench.shift:
        parts += [_scores_part(bench, evals, SHIFT, out), _ood_part(bench, evals, out)]
    parts += [_cost_part(bench, evals, out), "## Reliability diagrams\n\nIn-distribution, the seeds pooled: "
              "[reliability.png](reliability.png)\n"]
    if missing:
        parts.append("## Missing evaluations\n\n" + "".join(f"- {c.label}\n" for c in missing))
    _figure(bench, evals, methods, out / "reliability.png")
    write_text(out / "results.csv", _csv(LONG_COLUMNS, [_long_row(bench, e) for e in evals]))
    write_text(out / "report.md", "\n".join(parts))
    return out


def _label(task: str) -> str:
    return task_folder(task) if task.startswith("jsonl:") else task


def _header(bench: Benchmark) -> str:
    e = bench.eval
    train = ", ".join(f"{k}={v}" for k, v in bench.train.items()) or "the defaults"
    return (f"# Benchmark `{bench.path}`\n\nScale `{bench.scale}` (PROTOCOL.md); model `{bench.model}`; seeds "
            f"{', '.join(map(str, bench.seeds))}. Training: {train}. Evaluation: split {e['split']}, "
            f"{e['max_examples'] or 'all'} questions at most, ECE with {e['n_bins']} bins. Mean ± sample std over "
            f"the seeds; `*`: fewer seeds than listed. Made by `uqlora benchmark {bench.path}`.\n")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    align = [":---"] + ["---:"] * (len(header) - 1)
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [header, align, *rows])


def _csv(columns, rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _value(key: str, mean: float, std: float, runs: int, seeds: int) -> str:
    """`mean ± std` as compare shows it (percentages ×100 with 1 decimal, others 3 decimals), `*` if few seeds."""
    scale, digits = (100, 1) if key in PERCENT or key in ("auroc", "aupr") else (1, 3)
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if runs > 1 else "")
    return text + ("*" if runs < seeds else "")


# -- ACC / ECE / NLL / Brier ------------------------------------------------------------------------------

def _scores_part(bench: Benchmark, evals: list[Evaluation], setting: str, out: Path) -> str:
    """The Markdown table (methods × task groups) and its CSV for one setting."""
    agg = aggregated(evals, setting)
    tasks = list(bench.tasks) if setting == IN_DISTRIBUTION else list(bench.shift.eval_tasks)
    header = ["method", *(f"{_label(t)} {h}" for t in tasks for h in TABLE_METRICS.values())]
    rows = [[m, *(_score_cell(agg.get((m, t)), k, len(bench.seeds)) for t in tasks for k in TABLE_METRICS)]
            for m in bench.methods]
    columns = ["method", *(f"{_label(t)}:{c}" for t in tasks for k in TABLE_METRICS for c in (k, k + "_std")),
               *(f"{_label(t)}:runs" for t in tasks)]
    csv_rows = [{"method": m, **_wide_csv_row(agg, m, tasks)} for m in bench.methods]
    name = "in_distribution" if setting == IN_DISTRIBUTION else "shift"
    write_text(out / f"{name}.csv", _csv(columns, csv_rows))
    title = ("## In-distribution: trained and evaluated on each task" if setting == IN_DISTRIBUTION else
             f"## Distribution shift: trained on {_label(bench.shift.train_task)}, evaluated on other tasks")
    return f"{title}\n\n{_markdown(header, rows)}\nCSV: [{name}.csv]({name}.csv)\n"


def _score_cell(row: dict | None, key: str, seeds: int) -> str:
    return MISSING if row is None else _value(key, row[key], row[key + "_std"], row["runs"], seeds)


def _wide_csv_row(agg: dict, method: str, tasks: list[str]) -> dict:
    row = {}
    for t in tasks:
        found = agg.get((method, t))
        for k in TABLE_METRICS:
            row[f"{_label(t)}:{k}"] = "" if found is None else found[k]
            row[f"{_label(t)}:{k}_std"] = "" if found is None else found[k + "_std"]
        row[f"{_label(t)}:runs"] = 0 if found is None else found["runs"]
    return row


def _long_row(bench: Benchmark, e: Evaluation) -> dict:
    c = e.cell
    train, predict = train_cost(bench, c.method, c.task, c.seed), predict_cost(e.metrics)
    return {"setting": e.setting, "method": c.method, "train_task": c.task, "eval_task": c.eval_task,
            "seed": c.seed, **{k: e.metrics.get(k, "") for k in ("n", "n_samples", *TABLE_METRICS, "rms_ce")},
            "train_seconds": _blank(train.seconds), "train_peak_bytes": _blank(train.peak_bytes),
            "predict_seconds_per_question": _blank(predict.seconds), "predict_peak_bytes": _blank(predict.peak_bytes),
            "peak_memory_measure": _blank(predict.measure), "eval_folder": str(c.result)}


def _blank(value):
    return "" if value is None else value


# -- OOD detection ----------------------------------------------------------------------------------------

def _ood_part(bench: Benchmark, evals: list[Evaluation], out: Path) -> str:
    rows = ood_results(bench, evals)
    write_text(out / "ood.csv", _csv(("method", "seed", "ood_task", "score", "auroc", "aupr"), rows))
    tasks = list(bench.shift.eval_tasks)
    header = ["method", *(f"{_label(t)} {OOD_LABELS[s]}" for t in tasks for s in OOD_SCORES)]
    tables = []
    for metric in ("auroc", "aupr"):
        body = [[m, *(_ood_cell(rows, m, t, s, metric, len(bench.seeds)) for t in tasks for s in OOD_SCORES)]
                for m in bench.methods]
        tables.append(f"{metric.upper()} (%)\n\n{_markdown(header, body)}")
    return (f"## OOD detection: {_label(bench.shift.train_task)} test questions (negatives) against each shift "
            "task's (positives)\n\nScore: predictive entropy, and mutual information for methods that draw "
            "several samples (– otherwise). CSV: [ood.csv](ood.csv)\n\n" + "\n".join(tables))


def _ood_cell(rows: list[dict], method: str, task: str, score: str, metric: str, seeds: int) -> str:
    values = [r[metric] for r in rows if (r["method"], r["ood_task"], r["score"]) == (method, task, score)]
    return _value(metric, *mean_std(values), seeds) if values else MISSING


# -- cost -------------------------------------------------------------------------------------------------

def _costs(bench: Benchmark, evals: list[Evaluation]) -> dict[tuple[str, str, int], dict]:
    """(method, task, seed) -> {quantity: (value, peak measure)} over the in-distribution evaluations."""
    costs = {}
    for e in evals:
        if e.setting != IN_DISTRIBUTION:
            continue
        c = e.cell
        train, predict = train_cost(bench, c.method, c.task, c.seed), predict_cost(e.metrics)
        costs[(c.method, c.task, c.seed)] = {
            "train_seconds": (train.seconds, None), "predict_seconds": (predict.seconds, None),
            "train_peak": (train.peak_bytes, train.measure), "predict_peak": (predict.peak_bytes, predict.measure)}
    return costs


def _reference(bench: Benchmark) -> str | None:
    """MAP: the first entry trained with method map."""
    return next((n for n, s in bench.methods.items() if s.kind == "train" and s.method == "map"), None)


def _ratios(costs: dict, method: str, ref: str, quantity: str) -> list[float]:
    """The method's cost over MAP's on the same task and seed, where both are known (peaks: one measure)."""
    out = []
    for (m, task, seed), values in costs.items():
        mine, theirs = values[quantity], costs.get((ref, task, seed), {}).get(quantity, (None, None))
        if m == method and mine[0] is not None and theirs[0] and mine[1] == theirs[1]:
            out.append(mine[0] / theirs[0])
    return out


def _cost_part(bench: Benchmark, evals: list[Evaluation], out: Path) -> str:
    ref = _reference(bench)
    if ref is None:
        return "## Cost\n\nNo method is trained with `map`, so there is no MAP to relate the costs to.\n"
    costs = _costs(bench, evals)
    header, body, csv_rows = ["method", *(f"{h} (× MAP)" for h in COSTS.values())], [], []
    for method in bench.methods:
        ratios = {q: _ratios(costs, method, ref, q) for q in COSTS}
        body.append([method, *(_ratio_cell(ratios[q]) for q in COSTS)])
        csv_rows.append({"method": method, **{f"{q}_{k}": _blank(v) for q in COSTS
                                             for k, v in zip(("ratio", "ratio_std", "pairs"), _stats(ratios[q]))}})
    columns = ["method", *(f"{q}_{k}" for q in COSTS for k in ("ratio", "ratio_std", "pairs"))]
    write_text(out / "cost.csv", _csv(columns, csv_rows))
    return (f"## Cost relative to MAP (`{ref}`)\n\n{_reference_line(costs, ref)}\n\n{_markdown(header, body)}\n"
            "Ratios on the same task and seed, mean ± std over the pairs; n/a: not recorded (runs older than the "
            "peak-memory records). Train time includes the base run's training for post-hoc fits and every "
            "member's for ensembles. CSV: [cost.csv](cost.csv)\n")


def _stats(values: list[float]) -> tuple:
    return mean_std(values) if values else (None, None, 0)


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std, n = mean_std(values)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "")


def _reference_line(costs: dict, ref: str) -> str:
    """MAP's own costs, the means over tasks and seeds."""
    def mean(quantity: str) -> float | None:
        values = [v[quantity][0] for (m, _, _), v in costs.items() if m == ref and v[quantity][0] is not None]
        return sum(values) / len(values) if values else None

    measures = sorted({v["predict_peak"][1] for (m, _, _), v in costs.items() if m == ref and v["predict_peak"][1]})
    parts = [f"train {_fmt(mean('train_seconds'), '{:.1f} s')}",
             f"predict {_fmt(mean('predict_seconds'), '{:.3f} s')} per question",
             f"peak memory {_fmt(mean('train_peak'), '{:.0f} MiB', MIB)} in training, "
             f"{_fmt(mean('predict_peak'), '{:.0f} MiB', MIB)} in prediction"]
    note = (" (`process_max_rss`: the whole process's peak resident memory, model weights included)"
            if "process_max_rss" in measures else "")
    return f"MAP, mean over tasks and seeds: {'; '.join(parts)}{note}."


def _fmt(value: float | None, pattern: str, unit: float = 1) -> str:
    return "n/a" if value is None else pattern.format(value / unit)


# -- figure -----------------------------------------------------------------------------------------------

def _figure(bench: Benchmark, evals: list[Evaluation], methods: list[str], path: Path) -> None:
    panels = {}
    for method in methods:
        for task in bench.tasks:
            found = [e for e in evals if e.setting == IN_DISTRIBUTION and (e.cell.method, e.cell.task) ==
                     (method, task)]
            if found:
                panels[(method, _label(task))] = pooled_predictions(found)
    reliability_grid(panels, methods, [_label(t) for t in bench.tasks], bench.eval["n_bins"], path)
