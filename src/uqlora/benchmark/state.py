"""Whether a cell is done, and how an unfinished one goes on. A run directory on disk must hold the config the
cell would write (never mix runs made with other settings into the tables): otherwise one clear error.

    done     train: train_summary.json; posthoc: posterior/METHOD.json; combine: config.yaml (combine writes the
             folder whole); evaluate: metrics.json (written last) naming the same task, split and bins (a mix:
             and mixed from the expected members' evaluations)
    resume   an interrupted training with a checkpoint: `uqlora train --out RUN --resume`
    redo     an interrupted training before its first checkpoint, or an interrupted post-hoc fit (`uqlora
             posthoc` has no checkpoint): the partial folder is removed and the cell runs again
    run      nothing there yet

A finished run copied without its weights (benchmarks/archive_runs.py keeps text files only) is done as far as its
own cell goes; a cell still to run that reads it is refused before the sweep starts (weightless_inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import runs
from ..config import from_mapping
from ..errors import UqloraError
from .config import Benchmark
from .plan import Cell, expected_config

DONE, RESUME, REDO, RUN = "done", "resume", "redo", "run"


def cell_state(bench: Benchmark, cell: Cell) -> str:
    if cell.step == "evaluate":
        return _eval_state(bench, cell)
    run = cell.run
    if not run.is_dir() or not any(run.iterdir()):
        return RUN
    if not (run / runs.CONFIG).is_file():
        raise UqloraError(f"{run} exists but holds no {runs.CONFIG}, so it is not a run this benchmark made; "
                          "move it away or remove it")
    check_config(bench, cell)
    if _finished(bench, cell):
        return DONE
    if cell.step == "train" and (run / runs.CHECKPOINT).is_dir():
        return RESUME
    return REDO


def _finished(bench: Benchmark, cell: Cell) -> bool:
    if cell.step == "train":
        return (cell.run / runs.SUMMARY).is_file()
    if cell.step == "posthoc":
        return (cell.run / runs.POSTERIOR / f"{bench.methods[cell.method].method}.json").is_file()
    return True  # combine: config.yaml is there, and combine renames the finished folder into place


def check_config(bench: Benchmark, cell: Cell) -> None:
    """Refuse a run directory whose config.yaml differs from what the cell would write."""
    path = cell.run / runs.CONFIG
    expected = expected_config(bench, cell.method, cell.task, cell.seed)
    try:
        saved = from_mapping(runs.read_config(cell.run), str(path)).to_dict()
    except UqloraError as err:
        raise UqloraError(f"{cell.run} cannot be checked against {bench.path}: {err}; move it away or "
                          "remove it") from None
    if expected["framing"] == "auto":  # `uqlora train` saves what auto resolved to for the model
        saved.pop("framing")
        expected.pop("framing")
    differ = [f"{k}: {saved.get(k)!r} (expected {v!r})" for k, v in expected.items() if saved.get(k) != v]
    if differ:
        raise UqloraError(f"{cell.run} was made with other settings than methods.{cell.method} of {bench.path} "
                          f"would use: {'; '.join(differ)}. Move it away, or change the benchmark's out or settings")


def _eval_state(bench: Benchmark, cell: Cell) -> str:
    path = cell.result / "metrics.json"
    if not path.is_file():
        return RUN
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UqloraError(f"{path} is not valid JSON ({err}); remove it to evaluate again") from None
    expected = {"task": cell.eval_task, "split": bench.eval["split"], "n_bins": bench.eval["n_bins"]}
    found = dict(metrics)
    if cell.mixes:  # the members by TASK/RUN/eval/FOLDER, so that an `out` moved or named otherwise still matches
        expected["mixed_from"] = [_member(p) for p in cell.inputs]
        found["mixed_from"] = [_member(p) for p in metrics.get("mixed_from", ())] or None
    differ = [f"{k}: {found.get(k)!r} (expected {v!r})" for k, v in expected.items() if found.get(k) != v]
    if differ:
        how = "mixed" if cell.mixes else "evaluated"
        raise UqloraError(f"{path} was {how} with other settings than {bench.path} asks for: "
                          f"{'; '.join(differ)}. Move its folder away to make it again")
    return DONE


def _member(eval_dir) -> str:
    """A member's evaluation folder by its last four parts, TASK/RUN/eval/FOLDER."""
    return "/".join(Path(eval_dir).parts[-4:])


def has_weights(run: Path) -> bool:
    """Whether a run holds the weights that its evaluations and the runs made from it read: its adapter, or every
    member's (ensembles and their post-hoc fits)."""
    members = run / runs.MEMBERS
    if members.is_dir():
        folders = [m for m in members.iterdir() if m.is_dir()]
        return bool(folders) and all((m / runs.ADAPTER).is_dir() for m in folders)
    return (run / runs.ADAPTER).is_dir()


def weightless_inputs(cells: list[Cell], states: list[str]) -> list[tuple[Cell, Path]]:
    """(cell, run) for every cell still to run that reads a finished run holding no weights."""
    made = {cell.run: state for cell, state in zip(cells, states) if cell.step != "evaluate"}
    return [(cell, run) for cell, state in zip(cells, states) if state != DONE
            for run in cell.inputs if made.get(run) == DONE and not has_weights(run)]
