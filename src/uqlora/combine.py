"""`uqlora combine RUN... --out DIR`: an ensemble (from map runs) or MultiSWAG (from swag runs) made of runs that
are already trained, without training again.

`train --method ensemble --seed s --members M` trains member m exactly as `train --method map --seed s+m`
(tested bit for bit), so M finished runs with seeds s, s+1, ..., s+M-1 and otherwise identical settings are that
ensemble's members: combine copies them into DIR/members/m and writes the config `train` would have written.
Benchmarks use it to share one set of MAP (SWAG) runs between the single-model rows and the ensemble rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import runs
from .config import dump_yaml, from_mapping
from .errors import UqloraError
from .io import write_json, write_text

ENSEMBLE_OF = {"map": "ensemble", "swag": "multiswag"}
MEMBER_ONLY = {"seed", "members"}  # settings that may differ between the runs (members: unused by map, swag)
MEMBER_FILES = (runs.CONFIG, runs.ADAPTER, runs.POSTERIOR, runs.TRAIN_LOG, runs.SUMMARY)


def combine_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write the ensemble of `run_dirs` (in seed order) to `out`; returns `out`."""
    run_dirs, out = [Path(r) for r in run_dirs], Path(out)
    if len(run_dirs) < 2:
        raise UqloraError("combine needs at least two runs")
    if out.exists() and any(out.iterdir()):
        raise UqloraError(f"{out} already exists and is not empty; choose another --out")
    configs = []
    for run in run_dirs:
        config = runs.read_config(run)
        if config["method"] not in ENSEMBLE_OF:
            raise UqloraError(f"{run} was trained with --method {config['method']}; combine takes map runs "
                              "(-> ensemble) or swag runs (-> multiswag)")
        if not (run / runs.SUMMARY).is_file():
            raise UqloraError(f"{run} has not finished training ({runs.SUMMARY} is missing)")
        configs.append(config)
    order = sorted(range(len(run_dirs)), key=lambda i: int(configs[i]["seed"]))
    run_dirs, configs = [run_dirs[i] for i in order], [configs[i] for i in order]
    first = configs[0]
    # compared as `train` reads them: a setting added since a run was made is its default there
    settings = [from_mapping(c, f"{r / runs.CONFIG}").to_dict() for r, c in zip(run_dirs, configs)]
    for run, config in zip(run_dirs[1:], settings[1:]):
        differ = sorted(k for k in set(settings[0]) | set(config)
                        if k not in MEMBER_ONLY and settings[0].get(k) != config.get(k))
        if differ:
            raise UqloraError(f"{run} differs from {run_dirs[0]} in {', '.join(differ)}; an ensemble's members "
                              "differ only in their seed")
    seeds = [int(c["seed"]) for c in configs]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise UqloraError(f"the runs have seeds {seeds}; an ensemble's members have seeds s, s+1, ..., s+M-1 "
                          "(as `uqlora train --method ensemble --seed s` trains them)")
    config = {**first, "method": ENSEMBLE_OF[first["method"]], "members": len(run_dirs), "seed": seeds[0]}
    from_mapping(config, f"combined config of {run_dirs[0]}")  # the config `train` would accept
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for m, run in enumerate(run_dirs):
            member = runs.member_dir(tmp, m)
            member.mkdir(parents=True)
            runs.copy_entries(run, member, MEMBER_FILES)
        summaries = [runs.read_json(run / runs.SUMMARY) for run in run_dirs]
        write_text(tmp / runs.CONFIG, dump_yaml(config))
        write_json(tmp / runs.SUMMARY, {
            "members": len(run_dirs), "member_method": first["method"], "steps": sum(s["steps"] for s in summaries),
            "epoch_seconds": [t for s in summaries for t in s["epoch_seconds"]],
            "combined_from": [str(r) for r in run_dirs]})
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
