"""MAP LoRA: the point estimate of the fine-tuned LoRA weights, trained by cross-entropy over the C class
scores (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3). The predictive is the
softmax of the scores, one deterministic draw (S = 1). The same predictive without an adapter is the
zero-shot baseline."""

from __future__ import annotations

import torch

from .base import Method, ScoreFn


class MapMethod(Method):
    name = "map"

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        return torch.softmax(score_fn(questions), dim=-1)[None]  # [1, B, C]


class ZeroShotMethod(MapMethod):
    name = "zero-shot"
    trains = False
