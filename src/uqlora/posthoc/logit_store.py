"""The GLM logit Gaussians of a Laplace evaluation, kept beside its predictions so that the other link is free.

The linearised predictive (methods/laplace.py) first computes, per question, the Gaussian N(mu, Sigma) of its C
logits: one forward and C backward passes, about nine forward passes' work per question on the CPU. The links only
transform it (probit in closed form, mc by drawing logits), so `uqlora evaluate RUN --link mc` after the probit
evaluation (or the reverse) reads the Gaussians back from eval/.../logit_gaussians.safetensors instead of computing
them again: the same numbers, so the same probabilities as a fresh computation (tests/test_logit_store.py).

A saved file is used only if it was made from the same posterior file (its sha256) with the model in the same
dtype, and holds every question evaluated, with the same number of choices; otherwise everything is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.question import Question
from ..errors import UqloraError
from ..io import atomic_path

FILE = "logit_gaussians.safetensors"
Gaussian = tuple[torch.Tensor, torch.Tensor]  # mean [C], covariance [C, C] of one question's logits


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class LogitStore:
    """The Gaussians of one evaluation: those read from an earlier one (`known`) and those of this one (`made`)."""

    def __init__(self, posterior: Path, dtype: torch.dtype):
        self.key = {"posterior_sha256": file_sha256(posterior), "dtype": str(dtype)}
        self.known: dict[str, Gaussian] = {}
        self.made: dict[str, Gaussian] = {}
        self.reused = 0  # questions whose Gaussians came from `known`
        self.known_seconds = 0.0  # what one of the `known` Gaussians cost the evaluation that computed it

    def lookup(self, questions: list[Question]) -> list[Gaussian] | None:
        """Every question's saved Gaussian, or None if one of them is missing or has another number of choices."""
        found = [self.known.get(q.id) for q in questions]
        if all(g is not None and g[0].shape[0] == len(q.choices) for g, q in zip(found, questions)):
            self.reused += len(questions)
            return found
        return None

    def record(self, questions: list[Question], gaussians: list[Gaussian]) -> None:
        self.made.update((q.id, g) for q, g in zip(questions, gaussians))

    def read(self, path: Path) -> bool:
        """Take the Gaussians of `path` if it was made from the same posterior and dtype; True if it was."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if any(meta.get(k) != v for k, v in self.key.items()):
                    return False
                ids, counts = json.loads(meta["question_ids"]), json.loads(meta["choices"])
                self.known_seconds = float(meta["seconds_per_question"])
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")  # [N, C_max], [N, C_max, C_max]
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise UqloraError(f"corrupt logit Gaussians {path}: {err}; delete the file to recompute them") from None
        if not (len(ids) == len(counts) == mean.shape[0] == cov.shape[0]):
            raise UqloraError(f"corrupt logit Gaussians {path}: {len(ids)} ids, {len(counts)} choice counts, "
                              f"{mean.shape[0]} means; delete the file to recompute them")
        self.known.update((qid, (mean[i, :c], cov[i, :c, :c])) for i, (qid, c) in enumerate(zip(ids, counts)))
        return True

    @property
    def reused_seconds(self) -> float:
        """What the reused Gaussians cost when they were computed (the cost table counts it: benchmark/collect.py)."""
        return self.reused * self.known_seconds

    def write(self, path: Path, entries: list[tuple[str, Gaussian]], seconds: float) -> None:
        """Save `entries` (every process's `made`, gathered) beside the predictions; `seconds` is what they cost,
        the reused ones counted at their original cost."""
        width = max(g[0].shape[0] for _, g in entries)
        mean = torch.full((len(entries), width), float("-inf"), dtype=entries[0][1][0].dtype)  # [N, C_max]
        cov = torch.zeros(len(entries), width, width, dtype=entries[0][1][1].dtype)  # [N, C_max, C_max]
        for i, (_, (m, s)) in enumerate(entries):
            mean[i, : m.shape[0]], cov[i, : m.shape[0], : m.shape[0]] = m, s
        meta = {**self.key, "question_ids": json.dumps([qid for qid, _ in entries]),
                "choices": json.dumps([g[0].shape[0] for _, g in entries]),
                "seconds_per_question": repr(seconds / len(entries))}
        with atomic_path(path) as tmp:
            save_file({"mean": mean, "cov": cov}, str(tmp), metadata=meta)


def open_store(posterior: Path, dtype: torch.dtype, candidates: list[Path]) -> LogitStore:
    """A store for an evaluation with `posterior`, holding the Gaussians of the first matching candidate file."""
    store = LogitStore(posterior, dtype)
    for path in candidates:
        if path.is_file() and store.read(path):
            break
    return store
