"""`uqlora benchmark`: configs/smoke.yaml (map, mc-dropout as another predictive, temperature as a post-hoc fit,
a 2-member ensemble by combine, a shift task and its OOD table) run end to end on the tiny model and three small
task files, interrupted inside a training cell and run again.

Oracles: the report's ACC/ECE/NLL/Brier mean ± std equal `uqlora compare --aggregate` of the same runs; its
AUROC/AUPR equal `evaluation.ood.ood_report` of each seed's run, averaged; finished cells are not run again
(their files keep their modification times). Config errors and mismatched run directories: one error naming
the key or the folder.
"""

from __future__ import annotations

import csv
import os
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import uqlora.evaluate
import uqlora.train
from conftest import REPO, pretend_cpu, write_jsonl_task
from uqlora.benchmark import load_benchmark, run_benchmark
from uqlora.benchmark.plan import expected_config, plan, run_dir, subset
from uqlora.benchmark.runner import log_name, print_line, run_in_process, run_subprocess
from uqlora.benchmark.state import REDO, RESUME, cell_state
from uqlora.cli import main
from uqlora.errors import UqloraError
from uqlora.evaluation.ood import ood_report

pytestmark = pytest.mark.usefixtures("single_thread")
METHODS = ["map", "mc-dropout", "temperature", "ensemble", "ensemble-mix"]
SCORES = ("accuracy", "ece", "nll", "brier")
REPORT_FILES = ("report.md", "in_distribution.csv", "shift.csv", "results.csv", "ood.csv", "cost.csv",
                "reliability.png")


def smoke_config(root: Path, model_dir: Path, **changes) -> Path:
    """configs/smoke.yaml with the tiny model, three 24-question task files (a, b trained; c the shift task),
    checkpoints every 2 steps (so an interrupted training resumes) and `changes` on top; returns its path."""
    data = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    tasks = [f"jsonl:{write_jsonl_task(root / f'{name}.jsonl', 24, seed=i)}" for i, name in enumerate("abc")]
    data.update(model=str(model_dir), out=str(root / "out"), tasks=tasks[:2],
                shift={"train_task": tasks[0], "eval_tasks": [tasks[2]]})
    data["train"].update(device="cpu", save_every=2)
    data.update(changes)
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def finished_files(bench, cells) -> dict[Path, int]:
    """The file that marks each cell finished, with its modification time in ns."""
    marks = {"train": "train_summary.json", "posthoc": "posterior/temperature.json", "combine": "config.yaml"}
    paths = [c.result / "metrics.json" if c.step == "evaluate" else c.run / marks[c.step] for c in cells]
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir):
    """The smoke grid, interrupted (Ctrl-C) at optimizer step 3 of its second training (map seed 1 of task a, the
    ensemble's second member) and run again; returns (benchmark, progress lines of each run, mtimes of the cells
    finished by the first run, the cells' states between the runs)."""
    root = tmp_path_factory.mktemp("bench")
    bench = load_benchmark(smoke_config(root, tiny_model_dir))
    interrupted = run_dir(bench, "map", bench.tasks[0], 1)
    real_train = uqlora.train.train

    def ctrl_c(step: int) -> None:
        if step == 3:  # after the checkpoint of step 2 (save_every: 2)
            raise KeyboardInterrupt

    def train_interrupted(config, out, **kw):
        return real_train(config, out, **kw, **({"step_hook": ctrl_c} if Path(out) == interrupted else {}))

    first, second = [], []
    with pytest.MonkeyPatch.context() as mp:
        # each evaluation's own reliability.png is evaluate's business (tested there) and half of its time here
        mp.setattr(uqlora.evaluate, "plot_reliability", lambda *args, **kw: None)
        with mp.context() as interrupting:
            interrupting.setattr(uqlora.train, "train", train_interrupted)
            with pytest.raises(KeyboardInterrupt):
                run_benchmark(bench, execute=run_in_process, echo=first.append)
        done = [c for c in plan(bench) if cell_state(bench, c) == "done"]
        before = finished_files(bench, done)
        states = {c.label: cell_state(bench, c) for c in plan(bench)}
        run_benchmark(bench, execute=run_in_process, echo=second.append)
    return bench, first, second, before, states


def test_interrupted_sweep_resumes_without_redoing(grid):
    """The first run stops at the interrupted training (its checkpoint kept: state resume); the second does not
    touch the 8 cells finished before (map seed 0 trained, evaluated on task a and on the shift task c, then
    mc-dropout and temperature on both), resumes that training with --resume and runs the rest."""
    bench, first, second, before, states = grid
    label, total = f"train map {bench.tasks[0]} seed 1", len(plan(bench))
    assert [c.label for c in plan(bench)].index(label) == len(before) == 8 and states[label] == RESUME
    assert first[-1] == f"[9/{total}] {label}: interrupted; `uqlora benchmark {bench.path}` continues from there"
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert second[0] == f"{bench.path}: {total} cells, 8 done, {total - 8} to run"
    assert f"[1/{total - 8}] {label}: resuming the interrupted training" in second
    assert all(cell_state(bench, c) == "done" for c in plan(bench))
    done_lines = [line for line in second if ": done in " in line]
    assert len(done_lines) == total - 8 and all(line.endswith(" s") for line in done_lines)


def test_shift_evaluations_follow_their_run(grid):
    """A run of the shift's train task is evaluated on the shift task right after its own task, before the next
    entry's cells: the evaluations that read its weights are made while they exist."""
    bench = grid[0]
    labels = [c.label for c in plan(bench)]
    a, c = bench.shift.train_task, bench.shift.eval_tasks[0]
    for name in ("map", "mc-dropout", "temperature"):
        own = labels.index(f"evaluate {name} {a} seed 0 on {a}")
        assert labels[own + 1] == f"evaluate {name} {a} seed 0 on {c}"


def test_grid_trains_ensemble_members_beyond_the_seeds(grid):
    """Seeds 0, 1 with 2-member ensembles: map is trained on seeds 0, 1, 2 of each task, evaluated on 0 and 1, and on
    seed 2 only for the mix (its members' evaluations, on every task the ensemble is evaluated on)."""
    bench = grid[0]
    cells = plan(bench)
    trained = sorted((c.task, c.seed) for c in cells if c.step == "train")
    assert trained == sorted((t, s) for t in bench.tasks for s in (0, 1, 2))
    beyond = [c for c in cells if c.step == "evaluate" and c.seed == 2]
    assert {c.seed for c in cells if c.step == "evaluate"} == {0, 1, 2}
    assert {(c.method, c.note) for c in beyond} == {("map", "member of ensemble seed 1, ensemble-mix seed 1")}
    assert len(beyond) == len(bench.tasks) + 1  # in-distribution, and the shift task of tasks[0]
    combined = json.loads((run_dir(bench, "ensemble", bench.tasks[0], 1) / "train_summary.json").read_text())
    assert combined["combined_from"] == [str(run_dir(bench, "map", bench.tasks[0], s)) for s in (1, 2)]


def test_report_files_and_rows(grid):
    """Every report file; one in-distribution and shift row per method, one long row per method × task × seed,
    a cost row per method with MAP's ratios exactly 1, OOD rows with MI only for mc-dropout."""
    bench = grid[0]
    report = bench.out / "report"
    assert all((report / name).is_file() for name in REPORT_FILES)
    assert [r["method"] for r in read_csv(report / "in_distribution.csv")] == METHODS
    assert [r["method"] for r in read_csv(report / "shift.csv")] == METHODS
    long = read_csv(report / "results.csv")
    assert len(long) == len(METHODS) * 2 * 2 + len(METHODS) * 2  # in-distribution 2 tasks × 2 seeds; shift 1 task
    assert {(r["setting"], r["eval_task"]) for r in long} == {
        ("in-distribution", bench.tasks[0]), ("in-distribution", bench.tasks[1]), ("shift", bench.shift.eval_tasks[0])}
    cost = {r["method"]: r for r in read_csv(report / "cost.csv")}
    assert list(cost) == METHODS
    assert all(float(cost["map"][f"{q}_ratio"]) == 1.0 for q in ("train_seconds", "predict_seconds", "train_peak"))
    ood = read_csv(report / "ood.csv")
    assert {(r["method"], r["score"]) for r in ood if r["score"] == "mutual_information"} == {
        ("mc-dropout", "mutual_information"), ("ensemble", "mutual_information"),
        ("ensemble-mix", "mutual_information")}
    text = (report / "report.md").read_text()
    assert "Scale `smoke`" in text and "## OOD detection" in text and "Missing" not in text
    assert (report / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_equals_compare_aggregate(grid, tmp_path):
    """in_distribution.csv holds, per method and task, the mean and std `uqlora compare --aggregate` computes."""
    bench = grid[0]
    table = {r["method"]: r for r in read_csv(bench.out / "report" / "in_distribution.csv")}
    compare_names = {"map": "map", "mc-dropout": "mc-dropout", "temperature": "map+temperature",
                     "ensemble": "ensemble"}
    for task in bench.tasks:
        label = "jsonl-" + Path(task[6:]).stem
        for method, shown in compare_names.items():
            runs = [str(run_dir(bench, method, task, s)) for s in bench.seeds]
            assert main(["compare", *runs, "--task", task, "--aggregate", "--out", str(tmp_path)]) == 0
            row = next(r for r in read_csv(tmp_path / "comparison.csv") if r["method"] == shown)
            for key in SCORES:
                assert float(table[method][f"{label}:{key}"]) == float(row[key])
                assert float(table[method][f"{label}:{key}_std"]) == float(row[key + "_std"])
            assert table[method][f"{label}:runs"] == row["runs"] == "2"


def test_mix_equals_the_combined_ensemble(grid):
    """ensemble-mix (`uqlora mix` of the members' evaluations) and ensemble (`uqlora combine`, then `uqlora
    evaluate` running both members) give the same probabilities, mutual information and metrics, on every task and
    seed; the mix records its members' folders and the sum of their prediction seconds."""
    bench = grid[0]
    cells = {(c.method, c.task, c.seed, c.eval_task): c for c in plan(bench) if c.step == "evaluate"}
    pairs = [(c, cells[("ensemble-mix", *key[1:])]) for key, c in cells.items() if key[0] == "ensemble"]
    assert len(pairs) == 2 * 2 + 2 and all(mix.mixes and not c.mixes for c, mix in pairs)
    for cell, mix in pairs:
        combined, mixed = cell.result, mix.result
        assert mixed == run_dir(bench, "ensemble-mix", cell.task, cell.seed) / "eval" / combined.name
        a, b = (json.loads((d / "metrics.json").read_text()) for d in (combined, mixed))
        for key in (*SCORES, "mean_entropy", "mean_mutual_information"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        assert (b["method"], b["n_samples"], b["n"]) == (a["method"], a["n_samples"], a["n"]) == ("ensemble", 2, 16)
        members = [run_dir(bench, "map", cell.task, cell.seed + m) / "eval" / combined.name for m in (0, 1)]
        assert b["mixed_from"] == [str(m) for m in members]
        seconds = [json.loads((m / "metrics.json").read_text())["seconds"] for m in members]
        assert b["seconds"] == pytest.approx(sum(seconds), abs=0.011)
        rows_a, rows_b = ([json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]
                          for d in (combined, mixed))
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert (ra["id"], ra["label"]) == (rb["id"], rb["label"])
            assert rb["probs"] == pytest.approx(ra["probs"], abs=1e-6)
            assert rb["mutual_information"] == pytest.approx(ra["mutual_information"], abs=1e-6)


def test_ood_equals_ood_report(grid):
    """ood.csv and the report's AUROC cells: ood_report of each seed's run (mc-dropout's eval/TASK@mc-dropout)."""
    bench = grid[0]
    a, c = bench.shift.train_task, bench.shift.eval_tasks[0]
    rows = read_csv(bench.out / "report" / "ood.csv")
    for method, predictive in (("map", None), ("mc-dropout", "mc-dropout")):
        for seed in bench.seeds:
            direct = ood_report(run_dir(bench, method, a, seed), a, [c], "test", predictive)["ood"][c]["scores"]
            for score, values in direct.items():
                if score == "max_prob":
                    continue
                row = next(r for r in rows if (r["method"], r["seed"], r["score"]) == (method, str(seed), score))
                assert (float(row["auroc"]), float(row["aupr"])) == (values["auroc"], values["aupr"])
    mc = [float(r["auroc"]) for r in rows if (r["method"], r["score"]) == ("mc-dropout", "mutual_information")]
    cell = f"{100 * statistics.fmean(mc):.1f} ± {100 * statistics.stdev(mc):.1f}"
    auroc_table = (bench.out / "report" / "report.md").read_text().split("AUROC (%)")[1].split("AUPR (%)")[0]
    assert cell in next(line for line in auroc_table.splitlines() if line.startswith("| mc-dropout |"))


def test_peak_memory_recorded_and_na_for_older_runs(grid, tmp_path):
    """train_summary.json, the fit record and metrics.json carry the peak memory; a copy of the benchmark whose
    temperature fits lack it (as older runs do) reports n/a for temperature's training peak, numbers otherwise."""
    bench = grid[0]
    map_run = run_dir(bench, "map", bench.tasks[0], 0)
    for path in (map_run / "train_summary.json", map_run / "eval" / "jsonl-a" / "metrics.json",
                 run_dir(bench, "temperature", bench.tasks[0], 0) / "posterior" / "temperature.json"):
        record = json.loads(path.read_text())
        assert record["peak_memory_bytes"] > 0 and record["peak_memory_measure"] == "process_max_rss"
    copy = dataclasses.replace(bench, out=tmp_path / "out")
    shutil.copytree(bench.out, copy.out)
    for fit in copy.out.glob("runs/*/temperature-seed*/posterior/temperature.json"):
        record = json.loads(fit.read_text())
        del record["peak_memory_bytes"], record["peak_memory_measure"]
        fit.write_text(json.dumps(record))
    run_benchmark(copy, report_only=True, echo=lambda line: None)
    rows = read_csv(copy.out / "report" / "cost.csv")
    temperature = next(r for r in rows if r["method"] == "temperature")
    assert temperature["train_peak_ratio"] == "" and temperature["train_peak_pairs"] == "0"
    assert float(temperature["predict_peak_ratio"]) > 0
    cost_part = (copy.out / "report" / "report.md").read_text().split("## Cost")[1]
    line = next(ln for ln in cost_part.splitlines() if ln.startswith("| temperature |"))
    assert line.split(" | ")[3] == "n/a"


def test_cli_dry_run_and_report_only(grid, capsys):
    """`uqlora benchmark CONFIG --dry-run` lists every cell as done (with --methods/--seeds: the part's cells);
    --report-only rewrites the report, in OUT/REPORT for a config with `report: REPORT`, the same tables."""
    bench = grid[0]
    assert main(["benchmark", str(bench.path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bench.path}: {len(plan(bench))} cells ({len(plan(bench))} done)")
    assert all(line.startswith("  done  ") for line in out[1:])
    assert main(["benchmark", str(bench.path), "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {bench.out / 'report' / 'report.md'}"
    part = plan(subset(bench, methods=["map"], seeds=[0]))
    assert main(["benchmark", str(bench.path), "--dry-run", "--methods", "map", "--seeds", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"{bench.path}: {len(part)} cells ({len(part)} done)")
    named = bench.path.with_name("named.yaml")
    settings = {**yaml.safe_load(bench.path.read_text()), "report": "report-b"}
    named.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert main(["benchmark", str(named), "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {bench.out / 'report-b' / 'report.md'}"
    assert read_csv(bench.out / "report-b" / "in_distribution.csv") == read_csv(bench.out / "report" /
                                                                             "in_distribution.csv")


BAD_CONFIGS = [
    ({"methodz": {}}, "unknown key 'methodz'"),
    ({"scale": None}, "scale must be a non-empty text"),
    ({"seeds": [0, 0]}, "seeds lists 0 more than once"),
    ({"tasks": ["obqq"]}, "tasks[0]: unknown task 'obqq'"),
    ({"train": {"seed": 3}}, "train.seed is set by the benchmark"),
    ({"train": {"lr": "fast"}}, "train: lr must be float"),
    ({"eval": {"bins": 10}}, "eval: unknown key 'bins'"),
    ({"methods": {"map": {"samples": 3}}}, "methods.map.samples: method 'map' has a deterministic predictive"),
    ({"methods": {"map": {}, "t": {"posthoc": "mapp"}}}, "methods.t.posthoc: 'mapp' is not a method listed before"),
    ({"methods": {"map": {}, "mc": {"reuse": "map", "predictive": "swa"}}}, "methods.mc.predictive"),
    ({"methods": {"map": {}, "again": {"reuse": "map"}}}, "methods.again: evaluates 'map''s runs exactly"),
    ({"methods": {"map": {}, "ens": {"combine": "map", "members": 1}}}, "methods.ens.members must be an integer >= 2"),
    ({"methods": {"blob": {}, "ens": {"combine": "blob", "members": 2}}}, "methods.ens.combine: 'blob' must be"),
    ({"methods": {"m": {"method": "map", "options": {"clora_context": False}}}}, "methods.m: clora_context"),
    ({"methods": {"laplace": {}}}, "methods.laplace.method 'laplace' is not trained by `uqlora train`"),
    ({"shift": {"train_task": "arc-c", "eval_tasks": ["obqa"]}}, "shift.train_task 'arc-c' must be one of tasks"),
    ({"report": "runs"}, "report must be a folder name (letters, digits, _.+-) other than runs, logs and locks"),
    ({"report": "../up"}, "report must be a folder name"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_errors_name_the_key(tmp_path, changes, message):
    """One UqloraError per problem, naming the file and the key."""
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, **changes}, sort_keys=False))
    with pytest.raises(UqloraError) as err:
        load_benchmark(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_shipped_configs_plan(tmp_path):
    """configs/smollm2-cpu.yaml: 500 questions, 10 epochs (the measured budget), bf16; map and swag trained on
    seeds 0-4 for the 3-member ensembles, every method evaluated on 3 tasks and on the 6 shift tasks for seeds
    0-2. configs/smollm2-cpu-3ep.yaml: the same grid at foundation.sh's 3 epochs, in its own out."""
    first = load_benchmark(REPO / "configs" / "smollm2-cpu-3ep.yaml")
    assert expected_config(first, "map", "obqa", 0)["epochs"] == 3
    bench = load_benchmark(REPO / "configs" / "smollm2-cpu.yaml")
    assert bench.out != first.out and set(bench.methods) == set(first.methods)
    config = expected_config(bench, "map", "obqa", 0)
    assert (config["max_examples"], config["epochs"], config["lr"], config["batch_size"]) == (500, 10, 3e-4, 8)
    assert config["dtype"] == "bfloat16"
    cells = plan(bench)
    trained = {(c.method, c.task, c.seed) for c in cells if c.step == "train"}
    assert {s for m, t, s in trained if m == "map" and t == "arc-e"} == {0, 1, 2, 3, 4}
    assert {s for m, t, s in trained if m == "blob"} == {0, 1, 2}
    evals = [c for c in cells if c.step == "evaluate" and c.seed in bench.seeds]
    assert len(evals) == len(bench.methods) * 3 * (3 + 6)
    assert len({c.result for c in evals}) == len(evals)
    # the ensembles mix the evaluations of map and swag seeds s..s+2: seeds 3, 4 are evaluated for them alone
    members = [c for c in cells if c.step == "evaluate" and c.seed not in bench.seeds]
    assert {(c.method, c.seed) for c in members} == {(m, s) for m in ("map", "swag") for s in (3, 4)}
    assert len(members) == 2 * 2 * (3 + 6) and all(c.note.startswith("member of ") for c in members)
    assert sum(c.mixes for c in cells) == 2 * 3 * (3 + 6)
    # configs/smollm2-cpu-clora.yaml: C-LoRA variants in the same out (its map and clora runs are the grid's own),
    # its report in a folder of its own
    variants = load_benchmark(REPO / "configs" / "smollm2-cpu-clora.yaml")
    assert variants.out == bench.out and variants.report == "report-clora" and bench.report == "report"
    shared = {c.run: c.argv for c in cells if c.step == "train"}
    for cell in (c for c in plan(variants) if c.step == "train" and c.method in ("map", "clora")):
        assert shared[cell.run] == cell.argv
    authors = expected_config(variants, "clora-authors", "obqa", 0)
    assert (authors["clora_context_lr"], authors["clora_mean_init"]) == (0.02, "random")


def test_fp32_config_is_the_bf16_grid_in_fp32():
    """configs/smollm2-cpu-fp32.yaml extends configs/smollm2-cpu.yaml: the same cells and commands, with
    `--dtype float32` in place of bfloat16 and its own out (a grid's runs share one precision)."""
    bf16 = load_benchmark(REPO / "configs" / "smollm2-cpu.yaml")
    fp32 = load_benchmark(REPO / "configs" / "smollm2-cpu-fp32.yaml")
    assert fp32.out != bf16.out and fp32.methods == bf16.methods and fp32.shift == bf16.shift
    assert fp32.train == {**bf16.train, "dtype": "float32"} and fp32.eval == bf16.eval
    def in_fp32(text):
        return str(text).replace(str(bf16.out), str(fp32.out)).replace("bfloat16", "float32")

    expected = {tuple(map(in_fp32, c.key)): [in_fp32(a) for a in c.argv] for c in plan(bf16)}
    assert {c.key: [str(a) for a in c.argv] for c in plan(fp32)} == expected


def test_extends_merges_train_and_eval_and_replaces_the_rest(tmp_path):
    """`extends: FILE` (relative to the extending file): `train` and `eval` merged option by option, any other key
    replaced whole; a missing base and a cycle are errors naming the file."""
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "train": {**base["train"], "lr": 0.01}},
                                                       sort_keys=False))
    child = tmp_path / "sub" / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "../base.yaml", "seeds": [5], "train": {"epochs": 2},
                                     "eval": {"n_bins": 7}}))
    bench, parent = load_benchmark(child), load_benchmark(tmp_path / "base.yaml")
    assert bench.seeds == (5,) and bench.methods == parent.methods and bench.tasks == parent.tasks
    assert bench.train == {**parent.train, "epochs": 2} and bench.train["lr"] == 0.01
    assert bench.eval == {**parent.eval, "n_bins": 7}
    child.write_text(yaml.safe_dump({"extends": "nowhere.yaml"}))
    with pytest.raises(UqloraError, match="extends .*nowhere.yaml, which does not exist"):
        load_benchmark(child)
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": "loop2.yaml"}))
    (tmp_path / "loop2.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(UqloraError, match="a cycle"):
        load_benchmark(loop)


def test_subset_plans_the_selected_cells_and_what_they_start_from():
    """`--methods/--tasks/--seeds`: exactly the full plan's cells of the selected entries (plus the runs they start
    from), tasks and seeds, with the same folders and commands; a shift evaluation needs both of its tasks."""
    bench = load_benchmark(REPO / "configs" / "smollm2-cpu.yaml")
    full = {c.key: c for c in plan(bench)}
    part = plan(subset(bench, methods=["laplace-mc", "ensemble"], tasks=["obqa", "arc-c"], seeds=[1]))
    assert all(full[c.key].argv == c.argv for c in part)
    assert {c.method for c in part} == {"map", "laplace", "laplace-mc", "ensemble"}
    assert {(c.task, c.eval_task) for c in part if c.step == "evaluate"} == {
        ("obqa", "obqa"), ("arc-c", "arc-c"), ("obqa", "arc-c")}  # arc-c as a shift task of the obqa runs
    assert {c.seed for c in part if c.step != "train" and not c.note} == {1}
    assert {c.seed for c in part if c.step == "train"} == {1, 2, 3}  # the ensemble of seed 1 mixes 1..3
    members = {(c.method, c.seed, c.eval_task) for c in part if c.note and c.step == "evaluate"}  # for the mix
    assert members == {("map", s, t) for s in (2, 3) for t in ("obqa", "arc-c")}
    mixes = [c for c in part if c.mixes]
    assert {(c.task, c.eval_task) for c in mixes} == {("obqa", "obqa"), ("arc-c", "arc-c"), ("obqa", "arc-c")}
    for cell in mixes:
        assert [str(p) for p in cell.inputs] == [str(full[("evaluate", str(
            run_dir(bench, "map", cell.task, s) / "eval" / cell.result.name))].result) for s in (1, 2, 3)]
    only_arc = plan(subset(bench, tasks=["arc-e"], seeds=[0]))
    assert {c.task for c in only_arc} == {"arc-e"} and {c.eval_task for c in only_arc} == {"arc-e", None}
    for kwargs, message in [({"methods": ["lapl"]}, "no method 'lapl'"), ({"tasks": ["boolq"]}, "no task 'boolq'"),
                            ({"seeds": [7]}, "no seed 7"), ({"tasks": ["mmlu:college_physics"]}, "at least one")]:
        with pytest.raises(UqloraError, match=message):
            subset(bench, **kwargs)


def test_mismatched_or_foreign_run_directory_is_refused(tmp_path, tiny_model_dir):
    """A run folder whose config.yaml differs from the cell's (lr) is refused naming the folder and the key; a
    folder without config.yaml too; a partial post-hoc fit (config only) is redone."""
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))
    run = run_dir(bench, "map", bench.tasks[0], 0)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**expected_config(bench, "map", bench.tasks[0], 0), "lr": 0.1}))
    with pytest.raises(UqloraError, match=r"map-seed0 was made with other settings .* lr: 0.1 \(expected 0.005\)"):
        run_benchmark(bench, dry_run=True, echo=lambda line: None)
    (run / "config.yaml").unlink()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UqloraError, match="map-seed0 exists but holds no config.yaml"):
        run_benchmark(bench, dry_run=True, echo=lambda line: None)
    shutil.rmtree(run)
    fit = run_dir(bench, "temperature", bench.tasks[0], 0)
    fit.mkdir(parents=True)
    (fit / "config.yaml").write_text(yaml.safe_dump(expected_config(bench, "temperature", bench.tasks[0], 0)))
    cell = next(c for c in plan(bench) if c.step == "posthoc")
    assert cell.run == fit and cell_state(bench, cell) == REDO


def test_mix_result_made_otherwise_is_refused(tmp_path, tiny_model_dir):
    """A mix cell's folder is done only when its metrics.json names the expected members' evaluations (by
    TASK/RUN/eval/FOLDER, so a moved `out` still matches); one made by `evaluate` of a combined run, or from other
    members, is refused naming the folder."""
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))
    mix = next(c for c in plan(bench) if c.mixes)
    mix.result.mkdir(parents=True)
    metrics = {"task": mix.eval_task, "split": "test", "n_bins": bench.eval["n_bins"]}
    (mix.result / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UqloraError, match=r"ensemble-mix-seed0/eval/.*metrics.json was mixed with other settings"
                                          r".* mixed_from: None"):
        cell_state(bench, mix)
    moved = [str(Path("/elsewhere") / Path(p).relative_to(bench.out)) for p in mix.inputs]
    (mix.result / "metrics.json").write_text(json.dumps({**metrics, "mixed_from": moved}))
    assert cell_state(bench, mix) == "done"
    (mix.result / "metrics.json").write_text(json.dumps({**metrics, "mixed_from": moved[::-1]}))
    with pytest.raises(UqloraError, match="mixed_from"):
        cell_state(bench, mix)


def test_failed_cell_stops_the_sweep(tmp_path, tiny_model_dir):
    """A cell whose command fails: the sweep stops with one error naming the cell and how to continue."""
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))

    def fail(argv, log, threads, keep_fds):
        raise UqloraError("the data is gone")

    with pytest.raises(UqloraError, match=r"^train map jsonl:.* seed 0 failed: the data is gone\. The finished "
                                          r"cells are kept; `uqlora benchmark .*` continues from there$"):
        run_benchmark(bench, execute=fail, echo=lambda line: None)


def test_sweep_warns_of_emulated_bf16_before_running(tmp_path, tiny_model_dir, monkeypatch):
    """A grid training in bf16 on a CPU without bf16 units (models.cpu_bf16_warning, pretended here): the sweep
    says so before its first cell runs; a dry run (nothing runs) does not."""
    pretend_cpu(monkeypatch, "x86_64", False, False)
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))
    bench = dataclasses.replace(bench, train={**bench.train, "dtype": "bfloat16"})
    lines = []

    def fail(argv, log, threads, keep_fds):
        lines.append("first cell")
        raise UqloraError("stop here")

    with pytest.raises(UqloraError, match="stop here"):
        run_benchmark(bench, execute=fail, echo=lines.append)
    assert lines[1].startswith("warning: --dtype bfloat16 on a CPU without bf16")
    assert lines.index("first cell") > 1
    dry = []
    run_benchmark(bench, dry_run=True, echo=dry.append)
    assert not any(line.startswith("warning") for line in dry)


def test_parallel_jobs_respect_dependencies(tmp_path, tiny_model_dir, monkeypatch):
    """--jobs 2: every cell runs once, never more than two at a time (and two do run together), each only after
    the cells making what it reads (evaluate: its run; posthoc: the base; combine: the members; another Laplace
    link: the run's own evaluation, for its logit Gaussians; a mix: the members' evaluations) have ended; each cell gets OMP_NUM_THREADS = cores // 2."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    methods = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["methods"]
    methods.update({"laplace": {"posthoc": "map"}, "laplace-mc": {"reuse": "laplace", "link": "mc", "samples": 2}})
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir, methods=methods))
    cells = plan(bench)
    by_log = {bench.out / "logs" / log_name(c): c for c in cells}
    lock, active, events, threads = threading.Lock(), set(), [], set()

    def fake(argv, log, n_threads, keep_fds):
        cell = by_log[log]
        with lock:
            active.add(cell.key)
            events.append(("start", cell.key, len(active)))
            threads.add(n_threads)
        time.sleep(0.02 if cell.step == "evaluate" else 0.05)
        with lock:
            active.remove(cell.key)
            events.append(("end", cell.key, len(active)))

    with pytest.raises(UqloraError, match="nothing to report"):  # the fake cells wrote no evaluation
        run_benchmark(bench, execute=fake, echo=lambda line: None, jobs=2)
    starts = {key: i for i, (kind, key, _) in enumerate(events) if kind == "start"}
    ends = {key: i for i, (kind, key, _) in enumerate(events) if kind == "end"}
    assert len(starts) == len(cells) == len(events) / 2
    assert max(n for kind, _, n in events if kind == "start") == 2
    makers = {c.result if c.step == "evaluate" else c.run: c.key for c in cells}
    needs = [(c.key, makers[p]) for c in cells for p in c.inputs]
    assert {c.step for c in cells if c.inputs} == {"evaluate", "posthoc", "combine"}
    mixes = {c.key for c in cells if c.mixes}
    after_members = [(key, maker) for key, maker in needs if key in mixes]
    assert after_members and all(maker[0] == "evaluate" and "/map-seed" in maker[1] for _, maker in after_members)
    after_probit = [(key, maker) for key, maker in needs if maker[0] == "evaluate" and key not in mixes]
    assert after_probit and all("laplace-mc" in key[1] and "laplace-seed" in maker[1] for key, maker in after_probit)
    assert all(ends[maker] < starts[key] for key, maker in needs)
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}
    with pytest.raises(UqloraError, match="--jobs must be >= 1"):
        run_benchmark(bench, execute=fake, echo=lambda line: None, jobs=0)


def write_done_marks(bench, cell, weights: bool = True) -> None:
    """The files that make `cell` done (state.py), as its command would leave them (weights: False, as an archive of
    text files leaves them: no adapter folder)."""
    if cell.step == "evaluate":
        cell.result.mkdir(parents=True, exist_ok=True)
        mixed = {"mixed_from": [str(p) for p in cell.inputs]} if cell.mixes else {}
        (cell.result / "metrics.json").write_text(json.dumps(
            {"task": cell.eval_task, "split": bench.eval["split"], "n_bins": bench.eval["n_bins"], **mixed}))
        return
    cell.run.mkdir(parents=True, exist_ok=True)
    (cell.run / "config.yaml").write_text(yaml.safe_dump(expected_config(bench, cell.method, cell.task, cell.seed)))
    if weights:  # where the weights would be (combine: the members')
        (cell.run / ("members/0/adapter" if cell.step == "combine" else "adapter")).mkdir(parents=True)
    if cell.step == "train":
        (cell.run / "train_summary.json").write_text("{}")
    elif cell.step == "posthoc":
        (cell.run / "posterior").mkdir()
        (cell.run / "posterior" / f"{bench.methods[cell.method].method}.json").write_text("{}")


@pytest.fixture
def fake_sweep(tmp_path, tiny_model_dir, monkeypatch):
    """The smoke grid with an executor that only writes each cell's done marks (after 20 ms) and counts the runs
    of each cell; sweeps look at other sweeps' locks every 10 ms; no report. Returns (bench, cells, runs, execute)."""
    import uqlora.benchmark.runner as runner

    monkeypatch.setattr(runner, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(runner, "write_report", lambda bench: bench.out / "report")
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))
    cells = plan(bench)
    by_log = {bench.out / "logs" / log_name(c): c for c in cells}
    runs, count = {}, threading.Lock()

    def execute(argv, log, threads, keep_fds):
        cell = by_log[log]
        time.sleep(0.02)
        write_done_marks(bench, cell)
        with count:
            runs[cell.key] = runs.get(cell.key, 0) + 1

    return bench, cells, runs, execute


def test_runs_without_weights_are_named_before_anything_runs(tmp_path, tiny_model_dir):
    """Finished trainings copied without their weights (benchmarks/archive_runs.py keeps text files only), with
    their evaluations still to run: the sweep runs nothing and names every such run in one error; a dry run notes
    them; the same runs with their adapters are taken as they are."""
    bench = load_benchmark(smoke_config(tmp_path, tiny_model_dir))
    cells = plan(bench)
    trainings = [c for c in cells if c.step == "train"]
    for cell in trainings:
        write_done_marks(bench, cell, weights=False)
    ran = []
    with pytest.raises(UqloraError) as refused:
        run_benchmark(bench, execute=lambda *args: ran.append(args), echo=lambda line: None)
    assert not ran
    message = str(refused.value)
    assert f"{len(trainings)} finished run(s) hold no weights" in message
    assert all(str(c.run) in message for c in trainings)
    notes = []
    run_benchmark(bench, dry_run=True, echo=notes.append)
    assert any(line.startswith("  note: ") and "holds no weights" in line for line in notes)

    for cell in trainings:
        (cell.run / "adapter").mkdir()

    def stop(argv, log, threads, keep_fds):
        raise UqloraError("first cell reached")

    with pytest.raises(UqloraError, match="first cell reached"):
        run_benchmark(bench, execute=stop, echo=lambda line: None)


def test_archive_keeps_finished_runs_text_only(tmp_path):
    """benchmarks/archive_runs.py: a finished run's text files are copied (not its adapter or checkpoint), a mix's
    evaluation too; a training the sweep stopped during (config.yaml, no train_summary.json) is left out and
    named."""
    runs, dest = tmp_path / "runs", tmp_path / "archive"
    files = {"arc-e/map-seed0/config.yaml": "x", "arc-e/map-seed0/train_summary.json": "{}",
             "arc-e/map-seed0/adapter/adapter_config.json": "{}", "arc-e/map-seed0/eval/arc-e/metrics.json": "{}",
             "arc-e/map-seed0/eval/arc-e/reliability.png": "", "arc-e/ensemble-seed0/eval/arc-e/metrics.json": "{}",
             "arc-e/map-seed4/config.yaml": "x", "arc-e/map-seed4/train_log.jsonl": "",
             "arc-e/map-seed4/checkpoint/progress.json": "{}"}
    for name, text in files.items():
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_text(text)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "archive_runs.py"), str(runs), str(dest)],
                          capture_output=True, text=True, check=True)
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == ["arc-e/ensemble-seed0/eval/arc-e/metrics.json", "arc-e/map-seed0/config.yaml",
                      "arc-e/map-seed0/eval/arc-e/metrics.json", "arc-e/map-seed0/train_summary.json"]
    assert f"left out {runs / 'arc-e/map-seed4'}: its training has not finished" in done.stdout
    assert done.stdout.rstrip().endswith(f"4 files copied to {dest}")


def test_two_sweeps_on_one_out_run_each_cell_once(fake_sweep):
    """Two sweeps of one grid at once (each cell's lock is an flock of its own open file, so two threads of one
    process exclude each other as two processes do): every cell runs exactly once in all, and the second sweep
    says which cells it left to the first."""
    bench, cells, runs, execute = fake_sweep
    lines = {"a": [], "b": []}
    sweeps = [threading.Thread(target=run_benchmark, args=(bench,), kwargs=dict(execute=execute,
                               echo=lines[name].append, jobs=2)) for name in lines]
    for sweep in sweeps:
        sweep.start()
        time.sleep(0.005)
    for sweep in sweeps:
        sweep.join()
    assert runs == {c.key: 1 for c in cells}
    shared = [ln for ln in lines["a"] + lines["b"] if "another sweep is running it; waiting" in ln
              or "done by another sweep" in ln]
    assert shared and all(cell_state(bench, c) == "done" for c in cells)


def test_sweep_waits_for_a_cell_another_process_holds(fake_sweep):
    """A cell whose lock is held elsewhere (a sweep's cell still running after its sweep was killed): --dry-run
    shows it busy, without reading its folder; the sweep runs the rest and waits; when the holder has finished it
    and lets go, the cell counts as done, not run again, and what reads it runs."""
    from uqlora.benchmark.lock import try_lock
    from uqlora.benchmark.runner import cell_name

    bench, cells, runs, execute = fake_sweep
    first = cells[0]
    held = try_lock(bench.out, cell_name(first))
    first.run.mkdir(parents=True)  # a training just begun: no config.yaml yet, which a free cell would be refused for
    dry = []
    run_benchmark(bench, dry_run=True, echo=dry.append)
    assert f"  busy    {first.label}" in dry and "          (another sweep is running it)" in dry
    lines = []
    sweep = threading.Thread(target=run_benchmark, args=(bench,), kwargs=dict(execute=execute, echo=lines.append))
    sweep.start()
    time.sleep(0.5)
    readers = [c for c in cells if first.run in c.inputs]
    assert readers and sweep.is_alive() and first.key not in runs and not any(c.key in runs for c in readers)
    assert any(ln.endswith(f"{first.label}: another sweep is running it; waiting") for ln in lines)
    write_done_marks(bench, first)
    held.release()
    sweep.join(timeout=30)
    assert not sweep.is_alive()
    assert runs == {c.key: 1 for c in cells if c is not first}
    assert any(ln.endswith(f"{first.label}: done by another sweep") for ln in lines)


def test_subprocess_executor_logs_and_reports_errors(tmp_path):
    """run_subprocess: the command's output goes to the log; a failure raises its `error:` line and the log path."""
    log = tmp_path / "logs" / "cell.log"
    inherited = os.open(tmp_path, os.O_RDONLY)  # as a cell's lock: the command's process inherits it
    try:
        run_subprocess(["tasks"], log, keep_fds=(inherited,))
    finally:
        os.close(inherited)
    assert log.read_text().startswith("$ uqlora tasks\n") and "obqa" in log.read_text()
    with pytest.raises(UqloraError, match=r"`uqlora combine` exited with status 2: error: combine needs at least "
                                          r"two runs \(output: .*cell.log\)"):
        run_subprocess(["combine", str(tmp_path / "x"), "--out", str(tmp_path / "y")], log)


def test_progress_lines_from_concurrent_cells_stay_whole(capsys):
    """print_line (the sweep's default echo): lines written by several threads at once come out whole, one per
    line (print() writes the text and the newline separately, so two jobs' lines could run together)."""
    def report(worker):
        for i in range(200):
            print_line(f"[{worker}] cell {i}: running")

    threads = [threading.Thread(target=report, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(f"[{w}] cell {i}: running" for w in range(4) for i in range(200))


def test_predict_cost_counts_reused_logit_gaussians():
    """A Laplace link that read the other link's logit Gaussians back costs, per question, its own loop plus what
    the Gaussians had cost; other evaluations their loop alone."""
    from uqlora.benchmark.collect import predict_cost

    assert predict_cost({"seconds": 5.0, "n": 10}).seconds == 0.5
    reused = {"seconds": 1.0, "n": 10, "reused_logit_gaussians": 10, "reused_logit_gaussian_seconds": 39.0}
    assert predict_cost(reused).seconds == 4.0
