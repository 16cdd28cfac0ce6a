"""Comparison tables over run directories (DESIGN.md "Run directory"): collection, Markdown, CSV, terminal, errors.

Oracle: run directories written by hand in tmp_path with known metrics, and the expected table text written out.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from uqlora.errors import UqloraError
from uqlora.evaluation.compare import aggregate, collect_rows, print_table, to_csv, to_markdown, write_comparison

MAP_ARC = {"accuracy": 0.523456, "ece": 0.28049, "rms_ce": 0.3012, "nll": 1.23456, "brier": 0.654321,
           "n": 570, "n_bins": 15, "n_samples": 1}
MAP_OBQA = {"accuracy": 0.4, "ece": 0.1, "rms_ce": 0.125, "nll": 1.1, "brier": 0.7, "n": 500, "n_bins": 15,
            "n_samples": 1}
SWAG_ARC = {"accuracy": 0.55, "ece": 0.0549, "rms_ce": 0.07, "nll": 1.0, "brier": 0.6, "n": 570, "n_bins": 15,
            "n_samples": 10}


def make_run(root, name, method, evals):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(f"method: {method}\nmodel: smollm2-135m\nseed: 0\n")
    for task, metrics in evals.items():
        (run / "eval" / task).mkdir()
        (run / "eval" / task / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path, "map-s0", "map", {"obqa": MAP_OBQA, "arc-e": MAP_ARC}),
            make_run(tmp_path, "swag-s0", "swag", {"arc-e": SWAG_ARC})]


def test_collect_rows_one_task_and_all_tasks(runs):
    """task='arc-e' gives one row per run; task=None gives every evaluated task (sorted) with its metrics."""
    rows = collect_rows(runs, "arc-e")
    assert [(r["run"], r["method"], r["task"]) for r in rows] == [
        ("map-s0", "map", "arc-e"), ("swag-s0", "swag", "arc-e")]
    assert rows[0]["ece"] == MAP_ARC["ece"] and rows[1]["n"] == 570
    rows = collect_rows(runs, None)
    assert [(r["run"], r["task"]) for r in rows] == [("map-s0", "arc-e"), ("map-s0", "obqa"), ("swag-s0", "arc-e")]
    assert rows[1] == {"run": "map-s0", "method": "map", "task": "obqa",
                       **{k: MAP_OBQA[k] for k in ("n", "accuracy", "ece", "nll", "brier", "rms_ce")}}


def test_markdown_and_terminal_formatting(runs, capsys):
    """ACC, ECE and RMS-CE as percentages with 1 decimal, NLL and Brier with 3 decimals, in the fixed column order."""
    rows = collect_rows(runs, "arc-e")
    assert to_markdown(rows) == (
        "| run | method | task | n | ACC (%) | ECE (%) | NLL | Brier | RMS-CE (%) |\n"
        "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| map-s0 | map | arc-e | 570 | 52.3 | 28.0 | 1.235 | 0.654 | 30.1 |\n"
        "| swag-s0 | swag | arc-e | 570 | 55.0 | 5.5 | 1.000 | 0.600 | 7.0 |\n"
    )
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "method", "task", "n", "ACC", "(%)", "ECE", "(%)", "NLL", "Brier", "RMS-CE", "(%)"]
    assert lines[1].split() == ["map-s0", "map", "arc-e", "570", "52.3", "28.0", "1.235", "0.654", "30.1"]
    assert len({len(line) for line in lines}) == 1  # aligned: numbers right-justified to equal widths


def test_csv_round_trip_full_precision(runs, tmp_path):
    """The CSV parses back with the csv module to exactly the collected values; write_comparison writes both files."""
    rows = collect_rows(runs, None)
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert list(parsed[0]) == ["run", "method", "task", "n", "accuracy", "ece", "nll", "brier", "rms_ce"]
    for row, back in zip(rows, parsed):
        assert back["run"] == row["run"] and int(back["n"]) == row["n"]
        assert all(float(back[k]) == row[k] for k in ("accuracy", "ece", "nll", "brier", "rms_ce"))
    md_path, csv_path = write_comparison(rows, tmp_path / "out")
    assert (md_path.name, csv_path.name) == ("comparison.md", "comparison.csv")
    assert md_path.read_text() == to_markdown(rows) and csv_path.read_text() == to_csv(rows)
    assert sorted(p.name for p in md_path.parent.iterdir()) == ["comparison.csv", "comparison.md"]


def test_errors_name_the_path(runs, tmp_path):
    """Missing run dir, missing task, missing config and incomplete metrics.json raise UqloraError naming the path."""
    with pytest.raises(UqloraError, match="nope"):
        collect_rows([tmp_path / "nope"], "arc-e")
    with pytest.raises(UqloraError, match=r"swag-s0.*obqa"):
        collect_rows(runs, "obqa")
    with pytest.raises(UqloraError, match="no run directories"):
        collect_rows([], None)
    (runs[1] / "config.yaml").unlink()
    with pytest.raises(UqloraError, match="config.yaml"):
        collect_rows(runs, "arc-e")
    (runs[0] / "eval" / "obqa" / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(UqloraError, match=r"obqa.*metrics.json lacks the field\(s\) n, ece"):
        collect_rows(runs[:1], None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("method: map\nmodel: smollm2-135m\n")
    with pytest.raises(UqloraError, match="no evaluations"):
        collect_rows([empty], None)


def test_task_names_map_to_their_eval_folders(tmp_path):
    """`--task mmlu:college_chemistry` finds eval/mmlu-college_chemistry, the folder `evaluate` writes."""
    run = make_run(tmp_path, "zs", "zero-shot", {"mmlu-college_chemistry": MAP_OBQA})
    rows = collect_rows([run], "mmlu:college_chemistry")
    assert [(r["run"], r["task"], r["n"]) for r in rows] == [("zs", "mmlu-college_chemistry", 500)]


def test_aggregate_mean_and_sample_std(tmp_path):
    """Three seeds of one method: mean and sample standard deviation (ddof 1) against numpy; a single run
    has no ± in the table; the CSV keeps the std columns."""
    import numpy as np

    eces = [0.1, 0.2, 0.35]
    runs = [make_run(tmp_path, f"map-s{i}", "map", {"obqa": {**MAP_OBQA, "ece": e}}) for i, e in enumerate(eces)]
    runs.append(make_run(tmp_path, "zs", "zero-shot", {"obqa": MAP_OBQA}))
    agg = aggregate(collect_rows(runs, "obqa"))
    assert [(r["method"], r["runs"]) for r in agg] == [("map", 3), ("zero-shot", 1)]
    assert agg[0]["ece"] == pytest.approx(np.mean(eces))
    assert agg[0]["ece_std"] == pytest.approx(np.std(eces, ddof=1))
    md = to_markdown(agg)
    assert f"{100 * np.mean(eces):.1f} ± {100 * np.std(eces, ddof=1):.1f}" in md
    assert "| zero-shot | obqa | 1 | 500 | 40.0 | 10.0 |" in md
    header = to_csv(agg).splitlines()[0].split(",")
    assert header[:4] == ["method", "task", "runs", "n"] and "ece_std" in header


def test_aggregate_refuses_different_question_counts(tmp_path):
    runs = [make_run(tmp_path, "a", "map", {"obqa": MAP_OBQA}),
            make_run(tmp_path, "b", "map", {"obqa": {**MAP_OBQA, "n": 100}})]
    with pytest.raises(UqloraError, match="different numbers of questions"):
        aggregate(collect_rows(runs, "obqa"))


def test_other_predictives_and_temperature_runs(tmp_path):
    """With a task: eval/TASK@METHOD (`evaluate --method/--link/--samples 0`) are rows of their own beside
    eval/TASK; a temperature run is named after the method it rescales (base_method+temperature); the C-LoRA
    ablation (clora_context off) is a method of its own."""
    lap = make_run(tmp_path, "laplace-s0", "laplace", {"arc-e": MAP_ARC, "arc-e@laplace-mc": SWAG_ARC,
                                                        "obqa": MAP_OBQA})
    temp = make_run(tmp_path, "temp-s0", "temperature", {"arc-e": MAP_ARC})
    (temp / "config.yaml").write_text("method: temperature\nbase_method: swag\nmodel: smollm2-135m\nseed: 0\n")
    ablation = make_run(tmp_path, "clora-off-s0", "clora", {"arc-e": MAP_ARC})
    (ablation / "config.yaml").write_text("method: clora\nclora_context: 'off'\nmodel: smollm2-135m\nseed: 0\n")
    rows = collect_rows([lap, temp, ablation], "arc-e")
    assert [(r["run"], r["method"], r["task"]) for r in rows] == [
        ("laplace-s0", "laplace", "arc-e"), ("laplace-s0", "laplace-mc", "arc-e"),
        ("temp-s0", "swag+temperature", "arc-e"), ("clora-off-s0", "clora context=off", "arc-e")]
    assert rows[1]["ece"] == SWAG_ARC["ece"]
