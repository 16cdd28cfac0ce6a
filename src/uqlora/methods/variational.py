"""What the variational LoRA methods share: the closed-form Gaussian KL (BLoB, C-LoRA) and, for a per-token
posterior (C-LoRA), which positions of a layer's input are real tokens and the KL its layers add up in a forward.

Real tokens: a forward pre-hook on the model keeps the `attention_mask` of every call; a layer whose input has T
positions takes its last T columns (the cloze continuation forward's mask is [K, Lq + Lc] for inputs of Lc
positions: the question's cached part comes first). The KL of per-token posteriors is summed over those
positions only, never over padding.

Training: each variational layer adds its KL of this forward to `KlTally.total`; the method's `loss` reads the
tally once per micro-batch (`take`) and adds β·KL to the NLL. Prediction: `samples` draws (0: the posterior mean,
deterministic), draw s's noise from its own generator `base.draw_generator(seed, 0, s)`, several draws per forward
by batched.py.
"""

from __future__ import annotations

import torch

from ..errors import UqloraError
from ..head import causal_lm


class TokenMask:
    """The attention mask [rows, L] of the model's current forward (None: every position is real)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.handle = None

    def attach(self, model) -> None:
        """Hook the decoder, which every forward runs (the framings may call it without the model: head.py)."""
        def pre_hook(_module, args, kwargs):
            self.mask = kwargs.get("attention_mask")
        lm = causal_lm(model)
        decoder = getattr(lm, "base_model", lm)
        self.handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """Real-token indicator [rows, T] (x's dtype) for a layer input x [rows, T, d]."""
        rows, t = x.shape[0], x.shape[1]
        if self.mask is None:
            return torch.ones(rows, t, dtype=x.dtype, device=x.device)
        if self.mask.shape[0] != rows or self.mask.shape[1] < t:
            raise UqloraError(f"attention mask {tuple(self.mask.shape)} does not cover a layer input of "
                              f"{rows} rows x {t} positions")
        return self.mask[:, -t:].to(device=x.device, dtype=x.dtype)


class KlTally:
    """The KL terms added by the variational layers since the last `take` (a scalar tensor with its graph)."""

    def __init__(self):
        self.total: torch.Tensor | float = 0.0

    def add(self, kl: torch.Tensor) -> None:
        self.total = self.total + kl

    def take(self) -> torch.Tensor | float:
        total, self.total = self.total, 0.0
        return total


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mean, std²) || N(0, prior_std²)) elementwise: log(σp/σ) + (σ² + μ²)/(2σp²) − 1/2."""
    return torch.log(prior_std / std) + (std ** 2 + mean ** 2) / (2 * prior_std ** 2) - 0.5
