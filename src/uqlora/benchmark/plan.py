"""The cells of a benchmark: the run directories, the config each must hold, and the `uqlora` command lines that
make and evaluate them.

Layout: OUT/runs/TASK/METHOD-seedS for every run (TASK as `uqlora evaluate` names eval folders: `mmlu:x` ->
`mmlu-x`); an entry that reuses another's runs has none of its own; evaluations go where `uqlora evaluate` puts
them (RUN/eval/TASK, or RUN/eval/TASK@PREDICTIVE for another predictive of the run).
An ensemble of seed s combines the base runs of seeds s..s+M-1, so the base method is also trained on the seeds
beyond the grid's (their cells say "member of ..."). A `combine` entry copies the members' weights into its run and
evaluates that (the members beyond the grid's seeds are not evaluated); a `mix` entry has no run of its own: its
evaluation is `uqlora mix` of the members' evaluations on the same task (so those are made for every member), in
the folder where `uqlora evaluate` of the combined run would write it.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..combine import ENSEMBLE_OF
from ..config import from_mapping
from ..errors import UqloraError
from ..evaluate import ALTERNATIVE_PREDICTIVES, EvalOptions, result_dir
from ..methods import get_method
from ..posthoc.fit import LAPLACE_BASES, POSTHOC_METHODS, POSTHOC_OPTIONS
from .config import RESERVED, Benchmark, MethodSpec, Shift

LAPLACE = ("laplace", "laplace-ll")


@dataclass(frozen=True, eq=False)
class Cell:
    """One step of the grid: `uqlora ARGV` makes `run` (train, posthoc, combine) or evaluates it (evaluate)."""

    step: str  # train | posthoc | combine | evaluate
    method: str  # the benchmark's method (entry) name
    task: str  # the training task
    seed: int
    run: Path
    argv: tuple[str, ...]
    eval_task: str | None = None  # evaluate: the task evaluated on
    result: Path | None = None  # evaluate: the eval folder `uqlora evaluate` writes
    note: str = ""  # why a run (or evaluation) exists beyond the grid's seeds
    # the runs it reads (posthoc: the base; combine: the members; evaluate: the run, and for another Laplace link
    # the run's own evaluation, whose logit Gaussians it reuses; a mix: the members' evaluations)
    inputs: tuple[Path, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.step, str(self.result or self.run)

    @property
    def mixes(self) -> bool:
        """An evaluation made by `uqlora mix` of the members' evaluations (`inputs`), not by `uqlora evaluate`."""
        return self.argv[0] == "mix"

    @property
    def label(self) -> str:
        on = f" on {self.eval_task}" if self.eval_task is not None else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.step} {self.method} {self.task} seed {self.seed}{on}{note}"

    @property
    def command(self) -> str:
        return "uqlora " + shlex.join(self.argv)


def task_folder(task: str) -> str:
    """The folder name of a task, as `uqlora evaluate` names eval folders (`mmlu:x` -> `mmlu-x`)."""
    return runs.eval_dir(Path(), task, "test").name


def run_dir(bench: Benchmark, name: str, task: str, seed: int) -> Path:
    """Where the run of entry `name` lives; an entry that reuses another's runs evaluates those."""
    spec = bench.methods[name]
    if spec.kind == "reuse":
        return run_dir(bench, spec.base, task, seed)
    return bench.out / "runs" / task_folder(task) / f"{name}-seed{seed}"


def expected_config(bench: Benchmark, name: str, task: str, seed: int) -> dict:
    """The config.yaml the run of `name` must hold, resolved (TrainConfig.to_dict(); framing as configured)."""
    spec = bench.methods[name]
    if spec.kind == "reuse":
        return expected_config(bench, spec.base, task, seed)
    if spec.kind == "train":
        values = {"model": bench.model, **bench.train, **spec.options, "task": task, "seed": seed,
                  "method": spec.method}
    elif spec.kind == "posthoc":
        base = expected_config(bench, spec.base, task, seed)
        values = {**base, **spec.options, "method": spec.method,
                  "base_method": base["method"] if spec.method == "temperature" else None}
    else:  # combine: what `uqlora combine` writes; mix: the same, the run its evaluation stands for
        base = expected_config(bench, spec.base, task, seed)
        values = {**base, "method": ENSEMBLE_OF[base["method"]], "members": spec.members, "seed": seed}
    return from_mapping(values, bench.where(f"methods.{name}")).to_dict()


def eval_options(bench: Benchmark, spec: MethodSpec, task: str) -> EvalOptions:
    e = bench.eval
    return EvalOptions(task=task, split=e["split"], max_examples=e["max_examples"], n_bins=e["n_bins"],
                       samples=spec.samples, method=spec.predictive, link=spec.link, batch_size=e["batch_size"],
                       quiet=True)


def predictive_suffix(bench: Benchmark, name: str) -> str | None:
    """PREDICTIVE of the eval folders TASK@PREDICTIVE of entry `name` (None: the run's own predictive, TASK)."""
    config = _first_config(bench, name)
    folder = result_dir(Path(), config, eval_options(bench, bench.methods[name], bench.tasks[0])).name
    return folder.partition("@")[2] or None


# -- checks of the entries against the runs they will make (called by config.load_benchmark) --------------

def check_methods(bench: Benchmark) -> None:
    """Each entry's options, base and evaluation settings, with one error naming the entry's key."""
    suffixes: dict[tuple[str, str | None], str] = {}
    for name, spec in bench.methods.items():
        where = bench.where(f"methods.{name}")
        {"train": _check_train, "posthoc": _check_posthoc, "combine": _check_combine, "mix": _check_combine,
         "reuse": _check_reuse}[spec.kind](bench, spec, where)
        _check_samples(bench, spec, where)
        owner = (spec.base if spec.kind == "reuse" else name, predictive_suffix(bench, name))
        if owner in suffixes:
            raise UqloraError(f"{where}: evaluates the runs of {owner[0]!r} exactly as {suffixes[owner]!r} does "
                              f"(the same eval folder); give it another predictive, link or samples: 0")
        suffixes[owner] = name


def _first_config(bench: Benchmark, name: str) -> dict:
    """The config of entry `name`'s first run (first task and seed): its method and settings, as all its runs."""
    return expected_config(bench, name, bench.tasks[0], bench.seeds[0])


def _check_train(bench: Benchmark, spec: MethodSpec, where: str) -> None:
    for key in (k for k in RESERVED if k in spec.options):
        raise UqloraError(f"{where}.options.{key} is set by the benchmark for each cell; remove it")
    try:
        method = get_method(spec.method)
    except UqloraError as err:
        raise UqloraError(f"{where}.method: {err}") from None
    if method.posthoc or method.trained_by != "train" or not method.trains:
        raise UqloraError(f"{where}.method {spec.method!r} is not trained by `uqlora train`; post-hoc methods "
                          "are entries with `posthoc: BASE`")
    _first_config(bench, spec.name)  # the options and their values, as `uqlora train` checks them


def _check_posthoc(bench: Benchmark, spec: MethodSpec, where: str) -> None:
    if spec.method not in POSTHOC_METHODS:
        raise UqloraError(f"{where}.method must be one of {', '.join(POSTHOC_METHODS)}, got {spec.method!r}")
    for key in sorted(set(spec.options) - set(POSTHOC_OPTIONS)):
        raise UqloraError(f"{where}.options.{key} is not a post-hoc option ({', '.join(POSTHOC_OPTIONS)})")
    base = _first_config(bench, spec.base)["method"]
    if spec.method in LAPLACE and base not in LAPLACE_BASES:
        raise UqloraError(f"{where}.posthoc: {spec.method} needs runs with one point-estimate adapter "
                          f"({', '.join(LAPLACE_BASES)}); {spec.base!r} makes {base} runs")
    if spec.method == "swag-scale" and base != "swag":
        raise UqloraError(f"{where}.posthoc: swag-scale needs swag runs; {spec.base!r} makes {base} runs")
    if spec.method == "temperature" and base == "temperature":
        raise UqloraError(f"{where}.posthoc: {spec.base!r} is already temperature-scaled")
    _first_config(bench, spec.name)


def _check_combine(bench: Benchmark, spec: MethodSpec, where: str) -> None:
    base = bench.methods[spec.base]
    if base.kind != "train" or base.method not in ENSEMBLE_OF:
        raise UqloraError(f"{where}.{spec.kind}: {spec.base!r} must be a method trained with map or swag "
                          f"(`uqlora {spec.kind}` makes ensembles of map runs and MultiSWAG of swag runs)")
    _first_config(bench, spec.name)


def _check_reuse(bench: Benchmark, spec: MethodSpec, where: str) -> None:
    config = _first_config(bench, spec.base)
    allowed = ALTERNATIVE_PREDICTIVES.get(config["method"], ())
    if spec.predictive is not None and spec.predictive not in allowed:
        raise UqloraError(f"{where}.predictive: {spec.base!r} makes {config['method']} runs, whose training gives "
                          f"the predictives {', '.join((config['method'], *allowed))}; got {spec.predictive!r}")
    if spec.link is not None:
        if not {config["method"], config.get("base_method")} & set(LAPLACE):
            raise UqloraError(f"{where}.link applies to laplace and laplace-ll runs, not to {spec.base!r}")
        if spec.link not in ("probit", "mc"):
            raise UqloraError(f"{where}.link must be probit or mc, got {spec.link!r}")
    if predictive_suffix(bench, spec.name) is None:
        raise UqloraError(f"{where}: evaluates {spec.base!r}'s runs exactly as {spec.base!r} does; give "
                          "predictive, link or samples: 0 (the posterior mean)")


def _check_samples(bench: Benchmark, spec: MethodSpec, where: str) -> None:
    """`samples` as `uqlora evaluate --samples` would take it for this entry's predictive."""
    if spec.samples is None:
        return
    config = _first_config(bench, spec.name)
    name = spec.predictive or config["method"]
    overrides = {"link": spec.link} if spec.link else {}
    try:
        get_method(name, from_mapping({**config, **overrides, "method": name}, where)).check_samples(spec.samples)
    except UqloraError as err:
        raise UqloraError(f"{where}.samples: {err}") from None


# -- part of the grid ---------------------------------------------------------------------------------------

def subset(bench: Benchmark, methods=None, tasks=None, seeds=None) -> Benchmark:
    """The part of `bench` to run: only the entries `methods` (with the entries whose runs they start from),
    the cells trained or evaluated on `tasks` (a shift evaluation needs both its train task and its eval task
    selected) and the seeds `seeds` (ensembles still combine seeds s..s+M-1). None: all. Same runs, same folders."""
    where = f"{bench.path}: "
    names = list(bench.methods)
    for name in (m for m in methods or () if m not in names):
        raise UqloraError(f"{where}no method {name!r} in the grid ({', '.join(names)})")
    every_task = (*bench.tasks, *(bench.shift.eval_tasks if bench.shift else ()))
    for task in (t for t in tasks or () if t not in every_task):
        raise UqloraError(f"{where}no task {task!r} in the grid ({', '.join(every_task)})")
    for seed in (s for s in seeds or () if s not in bench.seeds):
        raise UqloraError(f"{where}no seed {seed} in the grid ({', '.join(map(str, bench.seeds))})")
    keep = set(methods or names)
    for name in reversed(names):  # a base is listed before the entries that start from it
        if name in keep and bench.methods[name].base is not None:
            keep.add(bench.methods[name].base)
    chosen = set(tasks or every_task)
    train_tasks = tuple(t for t in bench.tasks if t in chosen)
    if not train_tasks:
        raise UqloraError(f"{where}select at least one of the tasks trained on ({', '.join(bench.tasks)})")
    shift = None
    if bench.shift and bench.shift.train_task in chosen:
        eval_tasks = tuple(t for t in bench.shift.eval_tasks if t in chosen)
        shift = Shift(bench.shift.train_task, eval_tasks) if eval_tasks else None
    return dataclasses.replace(bench, methods={n: s for n, s in bench.methods.items() if n in keep},
                               tasks=train_tasks, seeds=tuple(s for s in bench.seeds if s in set(seeds or bench.seeds)),
                               shift=shift)


# -- the cells ------------------------------------------------------------------------------------------------

def plan(bench: Benchmark) -> list[Cell]:
    """Every cell in an order that respects dependencies: seed by seed (so a first complete seed comes early),
    task by task, method by method, each run made before its evaluations, the shift train task's run evaluated
    on the shift tasks right after its own test split: a run's weights live only on the machine that made it,
    so a sweep stopped between two sessions on fresh machines leaves no shift evaluation without its weights."""
    cells: dict[tuple[str, str], Cell] = {}
    members = _member_notes(bench)
    for seed in bench.seeds:
        for task in bench.tasks:
            shift_tasks = bench.shift.eval_tasks if bench.shift and task == bench.shift.train_task else ()
            for name in bench.methods:
                _make(bench, name, task, seed, cells, members)
                for eval_task in (task, *shift_tasks):
                    _evaluations(bench, name, task, seed, eval_task, cells, members)
    return list(cells.values())


def _add(cells: dict, cell: Cell) -> None:
    cells.setdefault(cell.key, cell)


def _make(bench: Benchmark, name: str, task: str, seed: int, cells: dict, members: dict) -> None:
    """The cells that make entry `name`'s run of (task, seed), after those of the runs it starts from."""
    spec = bench.methods[name]
    run = run_dir(bench, name, task, seed)
    if spec.kind == "reuse":
        _make(bench, spec.base, task, seed, cells, members)
        return
    if spec.kind == "train":
        config = expected_config(bench, name, task, seed)
        given = {**bench.train, **spec.options}
        argv = ("train", "--out", str(run), "--model", bench.model, "--task", task, "--method", spec.method,
                "--seed", str(seed), *_flags({k: config[k] for k in given}), "--quiet")
        note = members.get((name, seed), "")
        _add(cells, Cell("train", name, task, seed, run, argv, note=note))
        return
    if spec.kind == "posthoc":
        _make(bench, spec.base, task, seed, cells, members)
        base = run_dir(bench, spec.base, task, seed)
        config = expected_config(bench, name, task, seed)
        argv = ("posthoc", str(base), "--method", spec.method, "--out", str(run),
                *_flags({k: config[k] for k in spec.options}), "--quiet")
        _add(cells, Cell("posthoc", name, task, seed, run, argv, inputs=(base,)))
        return
    bases = []
    for m in range(spec.members):  # combine, mix
        _make(bench, spec.base, task, seed + m, cells, members)
        bases.append(run_dir(bench, spec.base, task, seed + m))
    if spec.kind == "mix":
        return
    _add(cells, Cell("combine", name, task, seed, run, ("combine", *map(str, bases), "--out", str(run)),
                     inputs=tuple(bases)))


def _member_notes(bench: Benchmark) -> dict[tuple[str, int], str]:
    """(base entry, seed beyond the grid's) -> "member of ensemble seed 1, 2" for the dry run."""
    notes: dict[tuple[str, int], list[str]] = {}
    for name, spec in bench.methods.items():
        if spec.kind in ("combine", "mix"):
            for seed in bench.seeds:
                for m in (m for m in range(spec.members) if seed + m not in bench.seeds):
                    notes.setdefault((spec.base, seed + m), []).append(f"{name} seed {seed}")
    return {k: "member of " + ", ".join(v) for k, v in notes.items()}


def _evaluations(bench: Benchmark, name: str, task: str, seed: int, eval_task: str, cells: dict,
                 members: dict) -> None:
    """The cells of entry `name`'s evaluation of (task, seed) on `eval_task`; a mix's after its members'."""
    spec = bench.methods[name]
    if spec.kind != "mix":
        _add(cells, _evaluate(bench, name, task, seed, eval_task))
        return
    inputs = []
    for m in range(spec.members):
        member = _evaluate(bench, spec.base, task, seed + m, eval_task, members.get((spec.base, seed + m), ""))
        _add(cells, member)
        inputs.append(member.result)
    run = run_dir(bench, name, task, seed)
    result = result_dir(run, expected_config(bench, name, task, seed), eval_options(bench, spec, eval_task))
    _add(cells, Cell("evaluate", name, task, seed, run, ("mix", *map(str, inputs), "--out", str(result)),
                     eval_task=eval_task, result=result, inputs=tuple(inputs)))


def _evaluate(bench: Benchmark, name: str, task: str, seed: int, eval_task: str, note: str = "") -> Cell:
    spec = bench.methods[name]
    run = run_dir(bench, name, task, seed)
    opts = eval_options(bench, spec, eval_task)
    argv = ["evaluate", str(run), "--task", eval_task, "--split", opts.split, "--n-bins", str(opts.n_bins),
            "--batch-size", str(opts.batch_size)]
    for flag, value in (("--max-examples", opts.max_examples), ("--samples", opts.samples),
                        ("--method", opts.method), ("--link", opts.link)):
        if value is not None:
            argv += [flag, str(value)]
    result = result_dir(run, expected_config(bench, name, task, seed), opts)
    inputs: tuple[Path, ...] = (run,)
    if spec.kind == "reuse" and spec.link is not None:  # after the run's own evaluation: it reads its logit Gaussians
        own = eval_options(bench, bench.methods[spec.base], eval_task)
        inputs += (result_dir(run, expected_config(bench, spec.base, task, seed), own),)
    return Cell("evaluate", name, task, seed, run, (*argv, "--quiet"), eval_task=eval_task, result=result,
                note=note, inputs=inputs)


def _flags(options: dict) -> list[str]:
    """`--name value` for each option (lists: several values; None: the default, left out)."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv
