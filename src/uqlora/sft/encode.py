"""Conversations -> token ids and labels through the tokenizer's chat template; truncation; packing; batches.

Labels. The loss is on the assistant turns only: every other token (system prompt, user turns, the template's
role headers) has label -100. For assistant turn k the labelled characters are found by rendering prefixes of the
conversation with the same template:

    start_k = len(template(messages[:k], add_generation_prompt=True))    # up to "<assistant header>"
    end_k   = len(template(messages[:k + 1]))                             # through the end-of-turn marker

so the labels cover the response and the template's end-of-turn marker (the model learns to stop). Each prefix must
be a prefix of the whole rendered conversation, which is checked: a template that renders earlier turns differently
once later turns exist is refused for that row rather than mislabelled. The whole conversation is tokenized once;
a token is labelled when its characters overlap [start_k, end_k) (the tokenizer's offsets). So a token that merges
the header's last character with the response's first ones (LIMA answers starting with "\n\n" after
"assistant\n" give one "\n\n\n" token) is labelled: every response character is covered. A tokenizer without
offsets (no fast tokenizer) uses token counts of the rendered prefixes, and refuses a row where they merge.

Truncation keeps the beginning (`max_length` tokens from the left; the end is cut): the prompt and the start of
the response stay. An example left with no labelled token is dropped (counted in train_summary.json).

Packing concatenates whole examples (none is split) into rows of at most `max_length` tokens, greedily in order.
Each example keeps its own position ids (0, 1, ...), and the model is called with position ids and no attention
mask, from which transformers (`masking_utils.find_packed_sequence_indices`) builds a block-diagonal causal mask:
no token attends across examples, so a packed row gives the same loss as its examples run separately (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import UqloraError
from .data import Conversation

IGNORE = -100


class Example(NamedTuple):
    ids: list[int]
    labels: list[int]  # aligned with ids: labels[i] = ids[i] on assistant tokens, IGNORE elsewhere
    positions: list[int]  # position ids: 0..len-1, restarting at every example in a packed row


def check_chat_template(tokenizer, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UqloraError(
            f"the tokenizer of {model!r} has no chat template: SFT renders conversations with it. Give one with "
            f"--chat-template FILE.jinja (e.g. the instruct model's chat_template.jinja), or put a "
            f"chat_template.jinja file in the model folder")


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes any special tokens (BOS, role markers) itself: add none
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises its own errors (e.g. `raise_exception` for a role order it refuses)
        raise UqloraError(f"{where}: the chat template refused this conversation: {err}") from None


def _turn_spans(tokenizer, conversation: Conversation, text: str) -> list[tuple[int, int]]:
    """Character spans [start_k, end_k) of the assistant turns in the rendered conversation `text`."""
    messages, where = conversation.messages, conversation.where
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:k], True, where)
        turn = _render(tokenizer, messages[:k + 1], False, where)
        if not (text.startswith(head) and text.startswith(turn) and len(turn) > len(head)):
            raise UqloraError(f"{where}: the chat template does not render turn {k} (assistant) as a prefix of the "
                              f"whole conversation, so its tokens cannot be located for the loss")
        spans.append((len(head), len(turn)))
    return spans


def encode(tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """Full-length (ids, labels) of one conversation: labels on the assistant turns only."""
    text = _render(tokenizer, conversation.messages, False, conversation.where)
    spans = _turn_spans(tokenizer, conversation, text)
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        inside = [any(s < b and a < e for s, e in spans) for a, b in enc["offset_mapping"]]
        return ids, [i if keep else IGNORE for i, keep in zip(ids, inside)]
    ids = _ids(tokenizer, text)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        head, turn = _ids(tokenizer, text[:start]), _ids(tokenizer, text[:end])
        if ids[:len(head)] != head or ids[:len(turn)] != turn:
            raise UqloraError(f"{conversation.where}: the response's first or last token merges with the template "
                              f"around it; a fast tokenizer (with offsets) is needed to label it")
        labels[len(head):len(turn)] = ids[len(head):len(turn)]
    return ids, labels


def encode_all(tokenizer, conversations: list[Conversation], max_length: int) -> tuple[list[Example], int]:
    """Encode and truncate (keep the first `max_length` tokens); returns the examples and how many were dropped
    for having no labelled token left (the first token is never a target: nothing predicts it)."""
    examples, dropped = [], 0
    for conversation in conversations:
        ids, labels = encode(tokenizer, conversation)
        ids, labels = ids[:max_length], [IGNORE] + labels[1:max_length]
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        examples.append(Example(ids, labels, list(range(len(ids)))))
    return examples, dropped


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate whole examples, in order, into rows of at most `max_length` tokens."""
    rows: list[Example] = []
    current = Example([], [], [])
    for ex in examples:
        if current.ids and len(current.ids) + len(ex.ids) > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.ids.extend(ex.ids)
        current.labels.extend(ex.labels)
        current.positions.extend(ex.positions)
    if current.ids:
        rows.append(current)
    return rows


def n_targets(example: Example) -> int:
    """Tokens the loss is computed on (labels[0] is never one: it is predicted by nothing)."""
    return sum(label != IGNORE for label in example.labels[1:])


def collate(rows: list[Example], pad_id: int, packed: bool, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels [B, L] and attention_mask (unpacked) or position_ids (packed:
    the padding tail gets its own positions 0, 1, ..., a separate segment that nothing attends to)."""
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        if packed:
            extra[i, :n] = torch.tensor(r.positions)
            extra[i, n:] = torch.arange(length - n)
        else:
            extra[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
    return {k: v.to(device) for k, v in batch.items()}
