"""MC dropout over the LoRA adapters (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation", eq. 7):
the predictive is the mean of the softmax over S forward passes with the LoRA input dropout active. Training is
MAP training with dropout; at prediction only the LoRA dropout layers drop, the rest of the model (its own
dropout, if any) stays in eval mode.

Draw s's masks come from its own CPU generator `draw_generator(seed, 0, s)`: for the call, each LoRA dropout is
swapped for a `batched.SeededDropout` (in training mode: the model's only active dropout) that draws, per forward,
the mask of every row of draw s from that generator. One draw per forward (the sequential loop) or S draws in one
forward (batched.py: the questions replicated S times, draw s's rows in block s) then give the same masks, so the
same predictive; it depends only on `evaluate --seed`, not on the batch order or the global torch RNG.
"""

from __future__ import annotations

import torch

from ..errors import UqloraError
from . import batched
from .base import Adapter, Method, ScoreFn, draw_generator


def lora_dropout_layers(model, adapter: str) -> list[torch.nn.Dropout]:
    """The active adapter's LoRA dropout layers (PEFT keeps them in `lora_dropout[adapter]`; Identity if p = 0)."""
    return [m for n, m in model.named_modules()
            if n.endswith(f"lora_dropout.{adapter}") and isinstance(m, torch.nn.Dropout) and m.p > 0]


class McDropoutMethod(Method):
    name = "mc-dropout"
    sampling = True
    default_samples = 10

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        super().bind(model, adapters, seed=seed)
        if not lora_dropout_layers(model, adapters[0].name):
            raise UqloraError("mc-dropout: the run's LoRA adapter has no dropout (lora_dropout 0); "
                              "train with --lora-dropout > 0")
        self.layers = batched.lora_linears(model, adapters[0].name)

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        def score(draws: range) -> torch.Tensor:  # [len(draws), B, C]
            batch = batched.DrawBatch.seeded(questions, [draw_generator(self.seed, 0, s) for s in draws])
            return batched.score_dropped(self.layers, self.adapters[0].name, batch, score_fn)

        return batched.predict_draws(n_samples, score, self.model, questions)  # [S, B, C]
