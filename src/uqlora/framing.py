"""Framings: (model, questions) -> class scores [B, C] (PROTOCOL.md "Framing").

- `letter`: the question and lettered choices ending in "Answer:"; the next-token logits at the last
  real position, restricted to the answer-letter tokens " A", " B", ... (left padding).
- `cloze`: the score of a choice is the mean log-probability of its tokens after "Question: ...\\nAnswer:".
  The question is encoded once and its KV cache is shared by its C continuations.

Questions with fewer choices than the batch maximum get score -inf in the missing columns, so a softmax
over the scores gives them probability 0. Everything downstream sees only these scores.
"""

from __future__ import annotations

import inspect
import string
from dataclasses import dataclass

import torch

from .config import DEFAULT_MAX_LENGTH
from .data.question import Question
from .errors import UqloraError
from .head import causal_lm, next_token_logits

FRAMINGS = ("letter", "cloze")
LETTERS = string.ascii_uppercase


def question_prompt(q: Question) -> str:
    """The shared head of both framings."""
    head = f"{q.context}\n" if q.context else ""
    return f"{head}Question: {q.stem}\n"


def letter_prompt(q: Question) -> str:
    lines = "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(q.choices))
    return f"{question_prompt(q)}{lines}Answer:"


def cloze_prompt(q: Question) -> str:
    return f"{question_prompt(q)}Answer:"


def letter_token_ids(tokenizer, n_choices: int) -> list[int]:
    """Token ids of " A", " B", ...: each must be one token, all distinct, or the framing is refused."""
    ids = []
    for letter in LETTERS[:n_choices]:
        tokens = tokenizer.encode(f" {letter}", add_special_tokens=False)
        if len(tokens) != 1:
            raise UqloraError(
                f"letter framing: the tokenizer splits ' {letter}' into {len(tokens)} tokens {tokens}; "
                "use --framing cloze for this model"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UqloraError(f"letter framing: answer letters share token ids {ids}; use --framing cloze")
    return ids


def _encode_left_padded(tokenizer, texts: list[str], max_length: int, device):
    """Tokenise with left padding and left truncation (the end of a prompt, with its question, is kept)."""
    rows = [tokenizer.encode(t, add_special_tokens=True)[-max_length:] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [B, L]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def letter_scores(model, tokenizer, questions: list[Question], max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """Answer-letter logits at the last prompt position: [B, C_max] float32 (-inf for absent choices)."""
    n_max = max(len(q.choices) for q in questions)
    letter_ids = torch.tensor(letter_token_ids(tokenizer, n_max))
    ids, mask = _encode_left_padded(tokenizer, [letter_prompt(q) for q in questions], max_length,
                                    _model_device(model))
    logits = next_token_logits(model, dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)))  # [B, V]
    scores = logits[:, letter_ids.to(logits.device)]  # [B, C_max]
    return _mask_absent(scores, questions)


def _mask_absent(scores: torch.Tensor, questions: list[Question]) -> torch.Tensor:
    n_choices = torch.tensor([len(q.choices) for q in questions], device=scores.device)
    absent = torch.arange(scores.shape[1], device=scores.device)[None, :] >= n_choices[:, None]  # [B, C_max]
    return scores.masked_fill(absent, float("-inf"))


@dataclass
class _Continuations:
    """All choices of a batch flattened: row k is choice `choice[k]` of question `owner[k]`."""

    ids: torch.Tensor  # [K, Lc] right-padded token ids
    mask: torch.Tensor  # [K, Lc] 1 for real tokens
    owner: torch.Tensor  # [K] question index in the batch
    choice: torch.Tensor  # [K] choice index within the question


def _encode_continuations(tokenizer, questions: list[Question], max_length: int, device) -> _Continuations:
    rows, owner, choice = [], [], []
    for b, q in enumerate(questions):
        for c, text in enumerate(q.choices):
            tokens = tokenizer.encode(f" {text}", add_special_tokens=False)[:max_length]
            if not tokens:
                raise UqloraError(f"question {q.id!r}: choice {c} ({text!r}) has no tokens")
            rows.append(tokens)
            owner.append(b)
            choice.append(c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    return _Continuations(ids.to(device), mask.to(device), torch.tensor(owner, device=device),
                          torch.tensor(choice, device=device))


def cloze_scores(model, tokenizer, questions: list[Question], max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """Mean log-probability of each choice's tokens after its question: [B, C_max] float32.

    Two forwards: the questions [B, Lq] (left-padded) with use_cache=True, then all B·C continuations
    [K, Lc] attending to their question's cached keys/values, selected (not recomputed) per continuation.
    """
    from transformers import DynamicCache

    device = _model_device(model)
    q_ids, q_mask = _encode_left_padded(tokenizer, [cloze_prompt(q) for q in questions], max_length, device)
    cont = _encode_continuations(tokenizer, questions, max_length, device)

    cache = DynamicCache(config=getattr(model, "config", None))
    cache_arg = {_cache_kwarg(model): cache}
    q_logits = next_token_logits(model, dict(input_ids=q_ids, attention_mask=q_mask, position_ids=_positions(q_mask),
                                             use_cache=True, **cache_arg))  # [B, V]
    first_logp = torch.log_softmax(q_logits, dim=-1)  # [B, V]: predicts each choice's 1st token

    cache.batch_select_indices(cont.owner)  # [K, heads, Lq, d] per layer: a question's cache per continuation
    q_len = q_mask.sum(-1)  # [B] real question tokens
    c_positions = q_len[cont.owner, None] + torch.arange(cont.ids.shape[1], device=device)[None, :]  # [K, Lc]
    predicts = torch.zeros_like(cont.mask, dtype=torch.bool)  # [K, Lc]: positions whose next token is a real one
    predicts[:, :-1] = cont.mask[:, 1:].bool()
    c_logits = next_token_logits(model, dict(input_ids=cont.ids, attention_mask=torch.cat([q_mask[cont.owner],
                                 cont.mask], dim=1), position_ids=c_positions, use_cache=True, **cache_arg),
                                 select=predicts)  # [N, V]: N real tokens after a choice's first
    real = predicts[:, :-1]  # [K, Lc-1]: which of tokens 2..Lc are real
    rest_logp = torch.zeros(real.shape, device=device)  # [K, Lc-1]
    rest_logp[real] = torch.log_softmax(c_logits, dim=-1).gather(-1, cont.ids[:, 1:][real][:, None]).squeeze(-1)

    token_logp = torch.cat([first_logp[cont.owner].gather(-1, cont.ids[:, :1]), rest_logp], dim=1)  # [K, Lc]
    mean_logp = (token_logp * cont.mask).sum(-1) / cont.mask.sum(-1)  # [K]

    scores = torch.full((len(questions), max(len(q.choices) for q in questions)), float("-inf"), device=device)
    return scores.index_put((cont.owner, cont.choice), mean_logp)  # [B, C_max]


def forward_row_owners(questions: list[Question], rows_per_call: list[int]) -> list[torch.Tensor]:
    """The question index of every row of each model forward that `class_scores` made for `questions`, given the
    row counts of those forwards: B rows (letter; cloze questions) are the questions in order; Σ C_n rows are the
    cloze continuations, question by question and choice by choice (`_encode_continuations`)."""
    b = torch.arange(len(questions))
    n_choices = torch.tensor([len(q.choices) for q in questions])
    owners = []
    for rows in rows_per_call:
        if rows == len(questions):
            owners.append(b)
        elif rows == int(n_choices.sum()):
            owners.append(torch.repeat_interleave(b, n_choices))
        else:
            raise UqloraError(f"a forward of {rows} rows matches neither the {len(questions)} questions nor their "
                              f"{int(n_choices.sum())} choices")
    return owners


def class_scores(framing: str, model, tokenizer, questions: list[Question], max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    if framing == "letter":
        return letter_scores(model, tokenizer, questions, max_length)
    if framing == "cloze":
        return cloze_scores(model, tokenizer, questions, max_length)
    raise UqloraError(f"unknown framing {framing!r}: choose {' or '.join(FRAMINGS)}")
