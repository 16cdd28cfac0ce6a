"""The benchmark YAML file (docs/benchmark.md) validated into a `Benchmark`: one UqloraError per problem, naming
the file and the key (`methods.swag.samples`).

Each entry of `methods` says how its runs are made, by exactly one of:
  (nothing)        `uqlora train --method METHOD` (METHOD: the `method` key, default the entry's name), with the
                   shared `train` options and the entry's `options`;
  posthoc: BASE    `uqlora posthoc` of BASE's runs (`method`: laplace, laplace-ll, temperature; `options`: the
                   post-hoc options);
  combine: BASE    `uqlora combine` of BASE's runs of seeds s..s+members-1 (BASE trains map or swag);
  mix: BASE        no runs of its own: the ensemble of BASE's runs of seeds s..s+members-1 (BASE trains map or
                   swag) from their evaluations, `uqlora mix` of their predictions (no weights read);
  reuse: BASE      no runs of its own: BASE's runs evaluated with another predictive (`predictive`: evaluate
                   --method, `link`, `samples: 0` for the posterior mean).
BASE must be an entry listed earlier. `samples` (evaluate --samples) may be given to every kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import from_mapping, read_yaml
from ..data.tasks import get_task
from ..errors import UqloraError

TOP_KEYS = {"model": True, "scale": True, "out": True, "seeds": True, "tasks": True, "methods": True,
            "train": False, "eval": False, "shift": False, "report": False, "extends": False}  # key -> required
MERGED_KEYS = ("train", "eval")  # `extends`: merged option by option; every other key replaces the base's
# set by the benchmark for every cell: not allowed in `train` or a method's `options`
RESERVED = ("model", "task", "seed", "method", "base_method")
EVAL_DEFAULTS = {"split": "test", "max_examples": None, "n_bins": 15, "batch_size": 8}
KINDS = ("posthoc", "combine", "mix", "reuse")  # the keys that name another entry; none of them: a training entry
ENTRY_KEYS = {"train": {"method", "options", "samples"},
              "posthoc": {"posthoc", "method", "options", "samples"},
              "combine": {"combine", "members", "samples"},
              "mix": {"mix", "members"},  # the draws are the members' own evaluations' (BASE's samples)
              "reuse": {"reuse", "predictive", "link", "samples"}}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # an entry's name is part of its run directories' names


@dataclass(frozen=True)
class MethodSpec:
    """One entry of `methods`: how its runs are made (`kind`) and how they are evaluated."""

    name: str
    kind: str  # train | posthoc | combine | mix | reuse
    method: str | None = None  # train, posthoc: the uqlora method
    base: str | None = None  # posthoc, combine, mix, reuse: the entry whose runs it starts from
    options: dict = field(default_factory=dict)  # train: TrainConfig options; posthoc: post-hoc options
    members: int | None = None  # combine, mix
    samples: int | None = None  # evaluate --samples
    predictive: str | None = None  # reuse: evaluate --method
    link: str | None = None  # reuse: evaluate --link


@dataclass(frozen=True)
class Shift:
    train_task: str  # one of the benchmark's tasks: its runs are evaluated on eval_tasks
    eval_tasks: tuple[str, ...]


@dataclass(frozen=True)
class Benchmark:
    path: Path  # the YAML file
    model: str
    scale: str  # PROTOCOL.md scale label (smoke, cpu, paper), printed on every table
    out: Path
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    train: dict  # TrainConfig options shared by every training
    eval: dict  # split, max_examples, n_bins, batch_size
    methods: dict[str, MethodSpec]  # in the file's order
    shift: Shift | None = None
    report: str = "report"  # the report folder's name in `out` (configs that share an out each keep their own)

    def where(self, key: str) -> str:
        return f"{self.path}: {key}"


def load_benchmark(path: str | Path) -> Benchmark:
    """Read and validate the benchmark file `path` (relative `out`: from the current directory)."""
    path = Path(path)
    data = _read_extended(path, ())
    for key in sorted(set(data) - set(TOP_KEYS)):
        raise UqloraError(f"{path}: unknown key {key!r}; valid keys: {', '.join(TOP_KEYS)}")
    for key in (k for k, required in TOP_KEYS.items() if required and k not in data):
        raise UqloraError(f"{path}: the key {key!r} is missing (docs/benchmark.md)")
    model, tasks = _text(data["model"], f"{path}: model"), _tasks(data["tasks"], f"{path}: tasks")
    entries = _mapping(data["methods"], f"{path}: methods")
    if not entries:
        raise UqloraError(f"{path}: methods must name at least one method")
    methods: dict[str, MethodSpec] = {}
    for name, entry in entries.items():
        methods[str(name)] = _method(str(name), entry, f"{path}: methods.{name}", methods)
    bench = Benchmark(
        path=path, model=model, scale=_text(data["scale"], f"{path}: scale"),
        out=Path(_text(data["out"], f"{path}: out")), seeds=_seeds(data["seeds"], f"{path}: seeds"), tasks=tasks,
        train=_train_options(data.get("train"), f"{path}: train", model, tasks[0]),
        eval=_eval_options(data.get("eval"), f"{path}: eval"), methods=methods,
        shift=_shift(data.get("shift"), f"{path}: shift", tasks),
        report=_report_name(data.get("report", "report"), f"{path}: report"))
    from .plan import check_methods  # the entries against the configs their runs will hold (plan imports us)

    check_methods(bench)
    return bench


def _read_extended(path: Path, seen: tuple[Path, ...]) -> dict:
    """The YAML of `path` on top of the file its `extends` names (relative to `path`'s folder), recursively."""
    data = read_yaml(path)
    if "extends" not in data:
        return data
    base_path = path.parent / _text(data.pop("extends"), f"{path}: extends")
    if base_path.resolve() in seen + (path.resolve(),):
        raise UqloraError(f"{path}: extends {base_path}, which extends {path} again (a cycle)")
    if not base_path.is_file():
        raise UqloraError(f"{path}: extends {base_path}, which does not exist (the path is relative to {path.parent})")
    base = _read_extended(base_path, seen + (path.resolve(),))
    for key in MERGED_KEYS:
        if key in data and key in base:
            data[key] = {**_mapping(base[key], f"{base_path}: {key}"), **_mapping(data[key], f"{path}: {key}")}
    return {**base, **data}


def _report_name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value) or value in ("runs", "logs", "locks"):
        raise UqloraError(f"{where} must be a folder name (letters, digits, _.+-) other than runs, logs and locks, "
                          f"got {value!r}")
    return value


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UqloraError(f"{where} must be a mapping of key: value, got {value!r}")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UqloraError(f"{where} must be a non-empty text, got {value!r}")
    return value


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UqloraError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _distinct_list(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise UqloraError(f"{where} must be a non-empty list, got {value!r}")
    repeated = sorted({str(v) for v in value if value.count(v) > 1})
    if repeated:
        raise UqloraError(f"{where} lists {', '.join(repeated)} more than once")
    return value


def _seeds(value, where: str) -> tuple[int, ...]:
    return tuple(_int(s, f"{where}[{i}]", 0) for i, s in enumerate(_distinct_list(value, where)))


def _tasks(value, where: str) -> tuple[str, ...]:
    tasks = tuple(_text(t, f"{where}[{i}]") for i, t in enumerate(_distinct_list(value, where)))
    for i, task in enumerate(tasks):
        if not task.startswith("jsonl:"):
            try:
                get_task(task)
            except UqloraError as err:
                raise UqloraError(f"{where}[{i}]: {err}") from None
    return tasks


def _train_options(value, where: str, model, task: str) -> dict:
    options = _mapping(value, where)
    for key in (k for k in RESERVED if k in options):
        raise UqloraError(f"{where}.{key} is set by the benchmark for each cell (model, tasks, seeds, methods); "
                          "remove it")
    from_mapping({"model": model, "task": task, **options}, where)  # names and values a training accepts
    return dict(options)


def _eval_options(value, where: str) -> dict:
    options = _mapping(value, where)
    for key in sorted(set(options) - set(EVAL_DEFAULTS)):
        raise UqloraError(f"{where}: unknown key {key!r}; valid keys: {', '.join(EVAL_DEFAULTS)}")
    merged = {**EVAL_DEFAULTS, **options}
    _text(merged["split"], f"{where}.split")
    if merged["max_examples"] is not None:
        _int(merged["max_examples"], f"{where}.max_examples", 1)
    _int(merged["n_bins"], f"{where}.n_bins", 1)
    _int(merged["batch_size"], f"{where}.batch_size", 1)
    return merged


def _shift(value, where: str, tasks: tuple[str, ...]) -> Shift | None:
    if value is None:
        return None
    shift = _mapping(value, where)
    for key in sorted(set(shift) ^ {"train_task", "eval_tasks"}):
        problem = "unknown key" if key in shift else "missing key"
        raise UqloraError(f"{where}: {problem} {key!r}; shift has train_task and eval_tasks")
    if shift["train_task"] not in tasks:
        raise UqloraError(f"{where}.train_task {shift['train_task']!r} must be one of tasks ({', '.join(tasks)}): "
                          "its runs and in-distribution evaluations are the grid's")
    eval_tasks = _tasks(shift["eval_tasks"], f"{where}.eval_tasks")
    if shift["train_task"] in eval_tasks:
        raise UqloraError(f"{where}.eval_tasks must not contain the train_task {shift['train_task']!r}")
    return Shift(shift["train_task"], eval_tasks)


def _method(name: str, entry, where: str, before: dict[str, MethodSpec]) -> MethodSpec:
    """One `methods` entry, checked on its own and against the entries `before` it."""
    if not NAME.match(name):
        raise UqloraError(f"{where}: a method's name must be letters, digits and _ . + - (it names run folders)")
    entry = _mapping(entry, where)
    kinds = [k for k in KINDS if k in entry]
    if len(kinds) > 1:
        raise UqloraError(f"{where}: give at most one of {', '.join(KINDS)} (got {', '.join(kinds)})")
    kind = kinds[0] if kinds else "train"
    for key in sorted(set(entry) - ENTRY_KEYS[kind]):
        raise UqloraError(f"{where}: unknown key {key!r} for a {kind} entry; valid: "
                          f"{', '.join(sorted(ENTRY_KEYS[kind]))}")
    values = {"name": name, "kind": kind}
    if kind != "train":
        values["base"] = _base(entry[kind], f"{where}.{kind}", before)
    if kind in ("train", "posthoc"):
        values["method"] = _text(entry.get("method", name), f"{where}.method")
        values["options"] = dict(_mapping(entry.get("options"), f"{where}.options"))
    if kind in ("combine", "mix"):
        values["members"] = _int(entry.get("members"), f"{where}.members", 2)
    if "samples" in entry:
        values["samples"] = _int(entry["samples"], f"{where}.samples", 0)
    for key in ("predictive", "link"):
        if key in entry:
            values[key] = _text(entry[key], f"{where}.{key}")
    return MethodSpec(**values)


def _base(value, where: str, before: dict[str, MethodSpec]) -> str:
    if value not in before:
        raise UqloraError(f"{where}: {value!r} is not a method listed before this one ({', '.join(before) or 'none'})")
    if before[value].kind == "reuse":
        raise UqloraError(f"{where}: {value!r} has no runs of its own (it reuses {before[value].base!r}'s); name "
                          "that method instead")
    return value
