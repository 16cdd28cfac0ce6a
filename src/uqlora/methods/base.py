"""The protocol every method follows (DESIGN.md "One protocol for every method").

A method sees a model and a function from questions to class scores [B, C]; it never reads files.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..data.question import Question
from ..errors import UqloraError

ScoreFn = Callable[[list[Question]], torch.Tensor]  # questions -> class scores [B, C] (-inf: absent choice)


class Method:
    name = "base"
    trains = True  # False: a post-hoc method or zero-shot, applied to a trained (or base) model

    def prepare(self, model):
        """Wrap or modify layers before training (e.g. variational LoRA); the default changes nothing."""
        return model

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-question training loss [B] from scores [B, C] and labels [B]; extra terms are added by subclasses."""
        return F.cross_entropy(scores, labels, reduction="none")

    def on_step_end(self, model, step: int) -> None:
        """Called after every optimizer step (e.g. SWAG moment collection)."""

    def predict(self, score_fn: ScoreFn, questions: list[Question], n_samples: int) -> torch.Tensor:
        """Class probabilities of S posterior draws: [S, B, C]."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Posterior state, saved as safetensors in the run's posterior/ folder; empty for point estimates."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UqloraError(f"method {self.name!r} keeps no posterior state, but the run's posterior/ has "
                              f"{sorted(state)[:3]}: it belongs to another method")
