"""Predictive probabilities for a list of questions, sharded over processes and gathered in order."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .data.question import Question
from .evaluation.metrics import mutual_information
from .framing import class_scores
from .methods.base import Method
from .methods.batched import AUTO, sample_batching


def shard(items: list, accelerator) -> list[int]:
    """This process's indices: a strided slice, so every question goes to exactly one process."""
    return list(range(accelerator.process_index, len(items), accelerator.num_processes))


class Predictive(NamedTuple):
    probs: torch.Tensor  # [N, C_max] mean over the draws of the class probabilities (0 for absent choices)
    draws: int  # S: posterior draws per question
    mutual_information: torch.Tensor  # [N] H(mean_s p_s) - mean_s H(p_s), the epistemic part (0 when S = 1)
    draw_probs: torch.Tensor | None = None  # [S, N, C_max] every draw's probabilities, with keep_draws=True


def predict_probs(method: Method, model, tokenizer, framing: str, questions: list[Question], *, accelerator,
                  batch_size: int, max_length: int, n_samples: int = 1, quiet: bool = False,
                  desc: str = "predict", keep_draws: bool = False, sample_batch: int = AUTO) -> Predictive:
    """The predictive of `method` on `questions`: mean probabilities over S posterior draws, and their MI.

    Every process gets the full result; each question is scored once, by one process. A sampling method scores
    `sample_batch` draws per forward (AUTO: CUDA as many as fit, CPU one; N: up to N; methods/batched.py), with
    the same result either way.
    """
    from accelerate.utils import gather_object

    def score_fn(qs: list[Question]) -> torch.Tensor:
        return class_scores(framing, model, tokenizer, qs, max_length)

    local = shard(questions, accelerator)
    rows: list[tuple] = []  # (question index, mean probs, mutual information, draws [S, C] or None)
    draws = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(questions), desc=desc, disable=quiet or not accelerator.is_main_process, leave=False)
    with torch.no_grad(), sample_batching(sample_batch, tokenizer):
        for start in range(0, len(local), batch_size):
            idx = local[start:start + batch_size]
            sample_probs = method.predict(score_fn, [questions[i] for i in idx], n_samples)  # [S, B, C]
            draws = sample_probs.shape[0]
            mean = sample_probs.float().mean(0).cpu()  # [B, C]: average probabilities, never logits
            mi = mutual_information(sample_probs.double().cpu())  # [B]
            rows.extend((i, mean[j].tolist(), float(mi[j]), sample_probs[:, j].float().cpu() if keep_draws else None)
                        for j, i in enumerate(idx))
            bar.update(len(idx) * accelerator.num_processes)
    bar.close()
    model.train(was_training)
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
        draws = max(gather_object([draws]))
    rows.sort(key=lambda r: r[0])
    assert [r[0] for r in rows] == list(range(len(questions))), "each question must be predicted exactly once"
    width = max(len(q.choices) for q in questions)
    probs = torch.zeros(len(questions), width)  # [N, C_max]; absent choices keep probability 0
    draw_probs = torch.zeros(draws, len(questions), width) if keep_draws else None  # [S, N, C_max]
    for i, p, _, d in rows:
        probs[i, : len(questions[i].choices)] = torch.tensor(p[: len(questions[i].choices)])
        if keep_draws:
            draw_probs[:, i, : len(questions[i].choices)] = d[:, : len(questions[i].choices)]
    return Predictive(probs, draws, torch.tensor([r[2] for r in rows], dtype=torch.float64), draw_probs)
