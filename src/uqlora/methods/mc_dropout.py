"""MC dropout over the LoRA adapters (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation", eq. 7):
the predictive is the mean of the softmax over S forward passes with the LoRA input dropout active. Training is
MAP training with dropout; at prediction only the LoRA dropout layers are switched on, the rest of the model
(its own dropout, if any) stays in eval mode. The draws follow the global torch seed (`evaluate --seed`)."""

from __future__ import annotations

import torch

from ..errors import UqloraError
from .base import Adapter, Method, ScoreFn


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
        self.layers = lora_dropout_layers(model, adapters[0].name)
        if not self.layers:
            raise UqloraError("mc-dropout: the run's LoRA adapter has no dropout (lora_dropout 0); "
                              "train with --lora-dropout > 0")

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        for layer in self.layers:
            layer.train()
        try:
            return torch.stack([torch.softmax(score_fn(questions), dim=-1) for _ in range(n_samples)])  # [S, B, C]
        finally:
            for layer in self.layers:
                layer.eval()
