"""Instruction data for `uqlora sft`: files -> conversations (lists of chat messages).

Two row formats, in a JSON array or in JSONL, optionally gzip-compressed (name ending in `.gz`):

- instruction rows (Alpaca / LLaMA-Factory, LIMA's format):
  {"instruction": str, "input": str (optional), "output": str,
   "history": [[user, assistant], ...] (optional, earlier turns), "system": str (optional)}
  become  [system?] + history turns + user (instruction, then "\\n" + input when input is not empty) + assistant.
- chat rows: {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.

A file may mix both. Every row keeps where it came from ("<file>, row N" in an array, "<file>, line N" in JSONL),
so a bad row is reported with its file, row and field.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import NamedTuple

from ..errors import UqloraError

ROLES = ("system", "user", "assistant")
# Rows drawn by --max-examples use this fixed seed, so every training seed trains on the same examples.
SUBSET_SEED = 0


class Conversation(NamedTuple):
    where: str  # "<file>, row N" / "<file>, line N"
    messages: list[dict]  # [{"role", "content"}, ...], at least one assistant turn


class BadRow(ValueError):
    """A row that does not fit its format; the reader adds the file and row."""


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UqloraError(f"{path}: unreadable ({err})") from None


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(where, row) for every object of a JSON array or JSONL file (gzip when the name ends in .gz)."""
    path = Path(path)
    if not path.is_file():
        raise UqloraError(f"SFT data file not found: {path}")
    text = _read_text(path)
    if text.lstrip().startswith("["):  # one JSON array
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UqloraError(f"{path}: malformed JSON array ({e.msg} at line {e.lineno}, column {e.colno})") from None
        located = [(f"{path}, row {i}", row) for i, row in enumerate(rows, 1)]
    else:
        located = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}, line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UqloraError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
    for where, row in located:
        if not isinstance(row, dict):
            raise UqloraError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not located:
        raise UqloraError(f"{path}: no rows")
    return located


def _text(row: dict, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        if required:
            raise BadRow(f"field '{field}' is missing")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise BadRow(f"field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"field '{field}' is empty")
    return value


def instruction_messages(row: dict) -> list[dict]:
    """An instruction row as chat messages (see the module docstring)."""
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False, allow_empty=True)
    output = _text(row, "output")
    system = _text(row, "system", required=False, allow_empty=True)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise BadRow(f"field 'history' must be a list of [user, assistant] pairs, got {type(history).__name__}")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRow(f"field 'history' item {i} must be a [user, assistant] pair of strings")
        if not pair[1].strip():
            raise BadRow(f"field 'history' item {i} has an empty assistant turn")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + ("\n" + extra if extra.strip() else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_messages(row: dict) -> list[dict]:
    """A chat row's messages, checked: known roles, string contents, a leading system turn only, and at
    least one assistant turn, none of them first or empty."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRow(f"field '{field}' must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise BadRow(f"field '{field}.role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise BadRow(f"field '{field}.content' must be a string")
        if m["role"] == "system" and i > 0:
            raise BadRow(f"field '{field}.role': a system turn may only come first")
        if m["role"] == "assistant" and (i == 0 or not m["content"].strip()):
            raise BadRow(f"field '{field}': an assistant turn must follow another turn and not be empty")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("field 'messages' has no assistant turn: nothing to train on")
    return out


def to_conversation(where: str, row: dict) -> Conversation:
    try:
        if "messages" in row:
            return Conversation(where, chat_messages(row))
        if "instruction" in row:
            return Conversation(where, instruction_messages(row))
        raise BadRow("expected a 'messages' field (chat rows) or an 'instruction' field (instruction rows)")
    except BadRow as err:
        raise UqloraError(f"{where}: {err}") from None


def load_conversations(path: str | Path, max_examples: int | None = None) -> list[Conversation]:
    """Every row of the file as a conversation (all rows are checked); `max_examples` of them drawn with a
    fixed seed, kept in file order."""
    conversations = [to_conversation(where, row) for where, row in read_rows(path)]
    if max_examples is not None and max_examples < len(conversations):
        keep = sorted(random.Random(SUBSET_SEED).sample(range(len(conversations)), max_examples))
        conversations = [conversations[i] for i in keep]
    return conversations
