"""C-LoRA: contextual low-rank adaptation (Rahmati et al. 2025, "C-LoRA: Contextual Low-Rank Adaptation for
Uncertainty Estimation in Large Language Models", arXiv 2505.17773, NeurIPS 2025).

The paper's light-weight factorisation puts an r×r matrix E between LoRA's A and B (ΔW = B E A), and makes the
posterior of E contextual: a small network of the token's own low-rank features gives its mean and variance.
For every adapted layer and every token t of every input row (numbered here; the paper's Section 3):

    z_t = A dropout(x_t)                                   [r]     the low-rank projection, LoRA's own
    h_t = W0 x_t + s · B (E_t z_t),  s = alpha / r                  the layer's output                      (1)
    q(E_t | z_t) = N(M(z_t), diag σ(z_t)²) over the r² entries
    [M(z) − I, ρ(z)] = W2 relu(W1 z + b1) + b2,  σ = sigmoid(ρ)²   the context network, hidden width H      (2)
    loss_i = −log p(y_i | x_i, E) + β Σ_layers Σ_real t KL(q(E_t | z_t) || N(I, σp² I))                     (3)

Training draws one E_t = M(z_t) + σ(z_t) ⊙ ε_t, ε_t ~ N(0, I), per token and per row (reparameterised, from the
global torch RNG: reproducible for a seed and restored by --resume). The predictive averages the softmax of S
such draws; S = 0 takes E_t = M(z_t), the posterior mean (deterministic). At prediction draw s takes its ε from its
own CPU generator `draw_generator(seed, 0, s)` (`evaluate --seed`), the same whether it is scored alone or with
other draws in one forward (batched.py: the questions replicated S times, draw s's rows in block s; A and B are
shared, only ε differs), and whatever the batch order.

Defaults, from the authors' public code (github.com/ahra99/c_lora, modelwrappers/c_lora.py), as the config help
says: H = 64, σp = 0.2, σ = sigmoid(ρ)², one training draw, 10 predictive draws. Where this module differs:
- M starts at I (W2's mean rows are zero) and the prior is centred at I: the layer starts as plain LoRA, and the
  KL costs nothing for plain LoRA with σ = σp. The code's mean starts random and its prior is N(0, σp²); as
  B E A is unchanged by E -> cE, B -> B/c, a zero-centred prior cannot shrink the update, only raise the noise.
  `clora_mean_init random` is the code's start and prior.
- One AdamW for A, B and the context network. The code trains the context network (so M and σ) by its own plain
  SGD at 0.02 with the run's warm-up/decay, outside AdamW: `clora_context_lr 0.02`.
- The KL sums over real tokens only (the code also sums it over padding), and β is one constant per question
  (the code scales the KL by 1e-6 / 65 and a per-step reweighting, and the NLL by per-dataset factors). The
  default β = 1e-6 is ours: a question's KL has r² terms per real token and adapted layer (~1e5-1e6 for
  SmolLM2-135M), so β = 1, the exact per-token ELBO, lets the prior erase the context (σ = σp, M = I
  everywhere), while at 1e-6 halving every σ costs ~0.1 nat per question, the scale of the NLL's changes.
- No flipout signs: the code multiplies the noise's input and output by random signs, which leaves an E drawn
  independently per token with the same distribution.
`--clora-context off` (the ablation) replaces the context network by learned M and ρ shared by all tokens; the
noise is still drawn per token and the KL still counted per real token, so only the context differs.
Measured with these defaults (BENCHMARKS.md "BLoB and C-LoRA at 10 epochs", benchmarks/clora_noise.py): σ stays
near its start (AdamW moves ρ by about the lr a step) and the mean E grows 2.5-3.6-fold, which B E A's scale
invariance allows and shrinks the noise's share of the update by as much, so the draws barely move the answers.
The authors' optimiser and start (both options above) do not change that: σ stays exactly at its start under SGD
too, and the ECE stays MAP's (BENCHMARKS.md "C-LoRA as the authors' code trains it").
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..errors import UqloraError
from . import batched
from .base import Adapter, Method, ScoreFn, draw_generator
from .variational import KlTally, TokenMask, gaussian_kl

# The E factors live in one ModuleDict on the PEFT model itself, outside its LoRA layers: PEFT saves everything
# of a LoRA layer in the adapter, which must hold only A and B. Keys: the LoRA layer's name, "." -> "/".
FACTORS_ATTR = "e_factors"


class ContextPosterior(nn.Module):
    """Eq. (2): M(z) and ρ(z) of every token from its low-rank features z [..., r]. `centre` I [r, r] (M = I + the
    network's output, which starts at 0) or None (M = the output, from PyTorch's init: the authors' code)."""

    def __init__(self, rank: int, hidden: int, centre: torch.Tensor | None):
        super().__init__()
        self.rank = rank
        self.hidden = nn.Linear(rank, hidden)
        self.out = nn.Linear(hidden, 2 * rank * rank)  # [M(z) − centre, ρ(z)], flattened
        self.register_buffer("centre", centre, persistent=False)
        if centre is not None:
            with torch.no_grad():  # M = I at the start (plain LoRA); ρ keeps PyTorch's init, σ ≈ sigmoid(0)² = 1/4
                self.out.weight[: rank * rank].zero_()
                self.out.bias[: rank * rank].zero_()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.out(F.relu(self.hidden(z)))  # [..., 2r²]
        delta, rho = out.unflatten(-1, (2, self.rank, self.rank)).unbind(-3)  # each [..., r, r]
        return (delta if self.centre is None else delta + self.centre.to(delta.dtype)), rho


class FixedPosterior(nn.Module):
    """The ablation (--clora-context off): one learned M and ρ [r, r] for every token; ρ = 0 at the start (σ = 1/4,
    what the context network's ρ starts near), M = `centre` (I) or, without one, entries U(−1/√H, 1/√H), as
    PyTorch starts the context network's output bias (the random start)."""

    def __init__(self, rank: int, hidden: int, centre: torch.Tensor | None):
        super().__init__()
        bound = 1 / math.sqrt(hidden)
        start = centre.clone() if centre is not None else torch.empty(rank, rank).uniform_(-bound, bound)
        self.mean = nn.Parameter(start)
        self.register_buffer("centre", centre, persistent=False)
        self.rho = nn.Parameter(torch.zeros(rank, rank))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.rho  # [r, r] each, broadcast over the tokens


def apply_e(e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """E z per token: e [..., r, r] (or [r, r]) and z [rows, T, r] -> [rows, T, r]."""
    return (e @ z.unsqueeze(-1)).squeeze(-1)


class EFactor(nn.Module):
    """E between A and B of one LoRA layer: z -> E z, E drawn per token from the draws of `draws` (prediction) or
    the global RNG in training mode; E = M in eval mode without draws."""

    def __init__(self, posterior: nn.Module, prior_std: float, mask: TokenMask, tally: KlTally | None):
        super().__init__()
        self.posterior = posterior
        self.prior_std = prior_std
        self.mask = mask  # the model's real tokens (plain attributes, not submodules)
        self.tally = tally  # None: no KL (evaluation)
        self.draws: batched.DrawBatch | None = None  # prediction: the posterior draws of the current forward

    def distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean M and standard deviation σ of q(E | z): [rows, T, r, r] each (context off: [r, r])."""
        mean, rho = self.posterior(z)
        return mean, torch.sigmoid(rho) ** 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z [rows, T, r]
        mean, std = self.distribution(z)
        if self.draws is not None:  # prediction: ε [rows, T, r, r], the rows of draw s from its generator
            eps = self.draws.per_row(self.draws.normal, (*z.shape, z.shape[-1]), z.device, z.dtype)
            return apply_e(mean + std * eps, z)
        if not self.training:
            return apply_e(mean, z)
        eps = torch.randn(*z.shape, z.shape[-1], dtype=z.dtype, device=z.device)  # [rows, T, r, r]
        if self.tally is not None:
            self.tally.add(self.kl(mean, std, z))
        return apply_e(mean + std * eps, z)

    def kl(self, mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. (3)'s KL of this layer, summed over the real tokens of z [rows, T, r] (float32 scalar)."""
        centre = self.posterior.centre  # the prior's mean: I, or None for 0 (the authors')
        offset = mean.float() if centre is None else mean.float() - centre.float()
        per_token = gaussian_kl(offset, std.float(), self.prior_std).sum((-2, -1))  # [rows, T] or []
        return (per_token * self.mask.positions(z).float()).sum()


def lora_layers(model, adapter: str) -> dict[str, nn.Module]:
    """The PEFT LoRA layers that hold `adapter`, by module name (none before an adapter is added)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _e_pre_hook(factor: EFactor, _module, args):
    return (factor(args[0]),)  # lora_B's input A dropout(x) becomes E A dropout(x)


class CLoraMethod(Method):
    name = "clora"
    sampling = True
    default_samples = 10  # the public code's --bayes-eval-n-samples-final
    mean_at_zero_samples = True

    def __init__(self, config=None):
        super().__init__(config)
        self.mask, self.tally = TokenMask(), KlTally()
        self.factors: dict[str, EFactor] = {}  # by the name of their LoRA layer

    def _settings(self) -> TrainConfig:
        return self.config if self.config is not None else TrainConfig()

    def _wrap(self, model, adapter: str, tally: KlTally | None) -> None:
        """Give every LoRA layer of `adapter` its E factor, applied by a pre-hook on lora_B (PEFT's own forward
        and saved adapter stay as they are)."""
        cfg = self._settings()
        layers = lora_layers(model, adapter)
        if not layers:
            raise UqloraError(f"clora: the model has no LoRA layers for adapter {adapter!r}")
        if hasattr(model, FACTORS_ATTR):
            raise UqloraError("clora: the model's LoRA layers already have their E factors")
        model.add_module(FACTORS_ATTR, nn.ModuleDict())
        for name, layer in layers.items():
            b = layer.lora_B[adapter]
            rank = b.in_features
            centre = torch.eye(rank) if cfg.clora_mean_init == "identity" else None  # of E's start and prior
            kind = ContextPosterior if cfg.clora_context == "on" else FixedPosterior
            factor = EFactor(kind(rank, cfg.clora_hidden, centre), cfg.clora_prior_std, self.mask,
                             tally).to(b.weight.device, b.weight.dtype)
            factor.train(model.training)
            getattr(model, FACTORS_ATTR)[name.replace(".", "/")] = factor
            b.register_forward_pre_hook(functools.partial(_e_pre_hook, factor))
            self.factors[name] = factor

    # ---- training ----
    def prepare(self, model):
        """Training: wrap the fresh LoRA layers. Evaluation calls this on the base model before its adapter is
        loaded: nothing to wrap yet (bind does it)."""
        if lora_layers(model, "default"):
            self._wrap(model, "default", self.tally)
            self.mask.attach(model)
        return model

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. (3) per question [B]: the micro-batch's KL (summed over its real tokens) spread evenly, so the sum
        over the micro-batch is Σ NLL + β·KL."""
        nll = F.cross_entropy(scores, labels, reduction="none")  # [B]
        return nll + self._settings().clora_kl_weight * self.tally.take() / len(nll)

    def sgd_parameters(self) -> tuple[list[nn.Parameter], float]:
        """With clora_context_lr > 0, the E posteriors' parameters, by plain SGD at that lr (the authors' code)."""
        lr = self._settings().clora_context_lr
        return ([p for factor in self.factors.values() for p in factor.parameters()] if lr > 0 else []), lr

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().to("cpu", copy=True).contiguous()
                for name, factor in self.factors.items() for k, v in factor.state_dict().items()}

    def training_state(self) -> dict[str, torch.Tensor]:
        return {}  # the E factors are trainable parameters: checkpoints keep them (and AdamW's moments, or none: SGD)

    # ---- evaluation ----
    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        self.model, self.adapters, self.seed = model, adapters, seed
        if len(adapters) != 1 or not adapters[0].posterior:
            raise UqloraError("clora: the run needs one adapter with its posterior/clora.safetensors "
                              "(was it trained with --method clora?)")
        self._wrap(model, adapters[0].name, tally=None)
        self._load(adapters[0].posterior)

    def _load(self, posterior: dict[str, torch.Tensor]) -> None:
        """Load the saved E factors; refuse tensors whose names or shapes are not this adapter's."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(posterior)), sorted(set(posterior) - set(expected))
        wrong = [k for k in expected if k in posterior and posterior[k].shape != expected[k]]
        if missing or unexpected or wrong:
            raise UqloraError(f"posterior/clora.safetensors does not match the run's adapter and clora settings "
                              f"(missing {missing[:2]}, unexpected {unexpected[:2]}, other shape {wrong[:2]}): "
                              f"it belongs to another run")
        for name, factor in self.factors.items():
            factor.load_state_dict({k[len(name) + 1:]: v for k, v in posterior.items() if k.startswith(name + ".")})
            factor.requires_grad_(False)

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        """[S, B, C]: S draws of every E, draw s from draw_generator(seed, 0, s); S = 0: [1, B, C] at E = M."""
        if n_samples == 0:
            return torch.softmax(score_fn(questions), dim=-1)[None]

        def score(draws: range) -> torch.Tensor:  # [len(draws), B, C]
            batch = batched.DrawBatch.seeded(questions, [draw_generator(self.seed, 0, s) for s in draws])
            try:
                for factor in self.factors.values():
                    factor.draws = batch
                return batched.score_draws(score_fn, batch)
            finally:
                for factor in self.factors.values():
                    factor.draws = None

        return batched.predict_draws(n_samples, score, self.model, questions)  # [S, B, C]
