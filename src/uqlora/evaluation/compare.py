"""Comparison tables across run directories (DESIGN.md, "Run directory": config.yaml, eval/TASK/metrics.json)."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from pathlib import Path

from uqlora.errors import UqloraError
from uqlora.runs import eval_dir as task_eval_dir
from uqlora.runs import read_config
from uqlora.io import write_text

COLUMNS = ("run", "method", "task", "n", "accuracy", "ece", "nll", "brier", "rms_ce")
METRIC_KEYS = ("n", "accuracy", "ece", "nll", "brier", "rms_ce")
HEADERS = {"accuracy": "ACC (%)", "ece": "ECE (%)", "rms_ce": "RMS-CE (%)", "nll": "NLL", "brier": "Brier"}
PERCENT = ("accuracy", "ece", "rms_ce")  # shown ×100 with 1 decimal; NLL and Brier with 3 decimals
SCORES = ("accuracy", "ece", "nll", "brier", "rms_ce")
# Aggregated over runs (seeds) of one method on one task: mean, and sample std in the `<metric>_std` keys.
AGG_COLUMNS = ("method", "task", "runs", "n", *SCORES)
TEXT_COLUMNS = ("run", "method", "task")


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UqloraError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise UqloraError(f"{path} must hold a JSON object, got {type(metrics).__name__}.")
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise UqloraError(f"{path} lacks the field(s) {', '.join(missing)}.")
    return {k: metrics[k] for k in METRIC_KEYS}


def collect_rows(run_dirs: list[Path], task: str | None = None) -> list[dict]:
    """One row per (run, task) with the COLUMNS keys; task None takes every task evaluated in each run."""
    if not run_dirs:
        raise UqloraError("no run directories given to compare.")
    rows = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise UqloraError(f"run directory {run_dir} does not exist.")
        config = read_config(run_dir)
        method = config["method"]
        if config.get("base_method"):  # temperature scaling of another method's predictive
            method = f"{config['base_method']}+{method}"
        if config.get("clora_context") == "off" and method == "clora":  # the ablation is its own row
            method = "clora context=off"
        if "label_smoothing" in config:  # `uqlora sft` runs: the smoothing tells the arms of an experiment apart
            method = f"{method} ls={float(config['label_smoothing']):g}"
        if task is None:
            paths = sorted((run_dir / "eval").glob("*/metrics.json"))
            if not paths:
                raise UqloraError(f"{run_dir / 'eval'} holds no evaluations (no */metrics.json).")
        else:
            own = task_eval_dir(run_dir, task, "test")
            if not (own / "metrics.json").is_file():
                raise UqloraError(f"{own / 'metrics.json'} does not exist: run {run_dir.name} has no evaluation on "
                                  f"{task}.")
            paths = [own / "metrics.json", *sorted(own.parent.glob(f"{own.name}@*/metrics.json"))]
        for path in paths:  # eval/TASK@METHOD: another predictive of the same run (`evaluate --method`)
            task_name, _, predictive = path.parent.name.partition("@")
            rows.append({"run": run_dir.name, "method": predictive or method, "task": task_name,
                         **_read_metrics(path)})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Group rows by (method, task), in first-seen order: mean and sample std (ddof 1) of each score."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["task"]), []).append(row)
    out = []
    for (method, task), members in groups.items():
        sizes = sorted({r["n"] for r in members})
        if len(sizes) > 1:
            raise UqloraError(f"{method} on {task}: runs were evaluated on different numbers of questions {sizes}")
        agg = {"method": method, "task": task, "runs": len(members), "n": sizes[0]}
        for key in SCORES:
            values = [r[key] for r in members]
            agg[key] = statistics.fmean(values)
            agg[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


def _columns(rows: list[dict]) -> tuple[str, ...]:
    return AGG_COLUMNS if rows and "runs" in rows[0] else COLUMNS


def _cell(key: str, row: dict) -> str:
    value = row[key]
    if key not in SCORES:
        return str(value)
    scale, digits = (100, 1) if key in PERCENT else (1, 3)
    text = f"{scale * value:.{digits}f}"
    if row.get("runs", 1) > 1:
        text += f" ± {scale * row[key + '_std']:.{digits}f}"
    return text


def _formatted(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = _columns(rows)
    return [HEADERS.get(k, k) for k in columns], [[_cell(k, row) for k in columns] for row in rows]


def to_markdown(rows: list[dict]) -> str:
    """A GitHub Markdown table; text columns left-aligned, numbers right-aligned."""
    header, body = _formatted(rows)
    align = [":---" if k in TEXT_COLUMNS else "---:" for k in _columns(rows)]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [header, align, *body])


def to_csv(rows: list[dict]) -> str:
    """CSV of the columns (plus `<metric>_std` when aggregated) with metrics at full precision (fractions)."""
    columns = _columns(rows)
    fields = [*columns, *(k + "_std" for k in SCORES)] if columns is AGG_COLUMNS else list(columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def print_table(rows: list[dict], file=None) -> None:
    """Print an aligned plain-text table (same formatting as the Markdown) to `file` (default stdout)."""
    header, body = _formatted(rows)
    columns = _columns(rows)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(columns))]
    for cells in [header, *body]:
        line = "  ".join(c.ljust(w) if k in TEXT_COLUMNS else c.rjust(w) for c, w, k in zip(cells, widths, columns))
        print(line.rstrip(), file=file or sys.stdout)


def write_comparison(rows: list[dict], out_dir) -> tuple[Path, Path]:
    """Write OUT_DIR/comparison.md and OUT_DIR/comparison.csv atomically; return their paths."""
    md_path, csv_path = Path(out_dir) / "comparison.md", Path(out_dir) / "comparison.csv"
    write_text(md_path, to_markdown(rows))
    write_text(csv_path, to_csv(rows))
    return md_path, csv_path
