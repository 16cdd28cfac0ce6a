"""The unit every task produces and every framing consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    id:       unique within its task and split (the dataset's own id where it has one)
    stem:     the question text (for WinoGrande the sentence with its blank "_")
    choices:  the answer texts, in the dataset's order (2 to 26 of them)
    label:    index of the correct choice in `choices`
    context:  text shown before the question (BoolQ's passage), or ""
    """

    id: str
    stem: str
    choices: tuple[str, ...]
    label: int
    context: str = ""
