"""Laplace-LoRA (Yang, Robeyns, Wang, Aitchison, ICLR 2024, "Bayesian Low-rank Adaptation for Large Language
Models"): a post-hoc Laplace approximation N(θ_MAP, (H + λI)^{-1}) over the LoRA parameters, H the K-FAC GGN
(posthoc/curvature.py, posthoc/kfac.py), λ the prior precision.

Predictive (their eq. 7-8; Immer et al. 2021): the linearised model f(θ) ≈ f(θ_MAP) + J (θ - θ_MAP) gives
Gaussian logits N(f(θ_MAP), J (H + λI)^{-1} J^T) per question, [C] and [C, C], from one forward and C backward
passes; then `probit` (the mean-field probit of posthoc/glm.py, deterministic) or `mc` (S draws of the logits,
seeded by the question alone). `evaluate` keeps the Gaussians, so the other link reuses them (posthoc/logit_store.py).
Training is MAP's; `laplace-ll` is the same over the LoRA linears of the last transformer block only.
"""

from __future__ import annotations

import zlib

import torch

from ..errors import UqloraError
from ..posthoc.curvature import batch_logit_jacobians, logit_covariance, lora_linears
from ..posthoc.glm import probit_probs, sample_logit_probs
from ..posthoc.kfac import Factor, KronBlock
from .base import Adapter, Method, ScoreFn, draw_generator

LINKS = ("probit", "mc")
PRIOR_KEY = "prior_precision"


def blocks_state(blocks: dict[str, KronBlock], prior_precision: float) -> dict[str, torch.Tensor]:
    """The posterior as flat tensors (posterior/laplace.safetensors): each block's factors and λ."""
    state = {PRIOR_KEY: torch.tensor(float(prior_precision), dtype=torch.float64)}
    for name, block in blocks.items():
        state.update(block.A.state_dict(f"{name}.A"))
        state.update(block.G.state_dict(f"{name}.G"))
    return state


def blocks_from_state(state: dict[str, torch.Tensor], linears: dict[str, torch.nn.Linear], where: str):
    """KronBlocks for `linears` from a saved posterior; refuses one made for another adapter."""
    if PRIOR_KEY not in state:
        raise UqloraError(f"{where}: no {PRIOR_KEY}; it is not a Laplace posterior")
    saved = {k.rsplit(".", 2)[0] for k in state if k != PRIOR_KEY}
    if saved != set(linears):
        extra, missing = sorted(saved - set(linears)), sorted(set(linears) - saved)
        raise UqloraError(f"{where} does not match the run's adapter: posterior blocks not in the adapter "
                          f"{extra[:2]}, adapter linears without a block {missing[:2]}")
    blocks = {}
    for name, linear in linears.items():
        block = KronBlock(A=Factor.from_state_dict(state, f"{name}.A"), G=Factor.from_state_dict(state, f"{name}.G"))
        if (block.G.dim, block.A.dim) != tuple(linear.weight.shape):
            raise UqloraError(f"{where}: block {name} is {block.G.dim}x{block.A.dim} but the adapter's weight is "
                              f"{tuple(linear.weight.shape)}")
        blocks[name] = block
    return blocks, float(state[PRIOR_KEY])


class LaplaceMethod(Method):
    name = "laplace"
    last_layer = False
    posthoc = True  # `uqlora posthoc` fits it on a run; `uqlora train --method laplace` trains MAP, then fits
    mc_default_samples = 10

    def __init__(self, config=None):
        super().__init__(config)
        self.link = getattr(config, "link", "probit")
        if self.link not in LINKS:
            raise UqloraError(f"link must be one of {', '.join(LINKS)}, got {self.link!r}")

    @property
    def sampling(self) -> bool:
        return self.link == "mc"

    @property
    def default_samples(self) -> int:
        return self.mc_default_samples if self.sampling else 1

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        if len(adapters) != 1:
            raise UqloraError(f"{self.name}: one adapter expected, got {len(adapters)}")
        self.model, self.adapters, self.seed = model, adapters, seed
        self.linears = lora_linears(model, adapters[0].name, last_layer=self.last_layer)
        blocks, self.prior_precision = blocks_from_state(adapters[0].posterior, self.linears,
                                                         f"{self.name} posterior")
        self.blocks = list(blocks.values())
        for m in self.linears.values():
            m.weight.requires_grad_(True)  # for the Jacobians; the weights themselves never change

    def logit_store_sources(self) -> tuple[str | None, ...]:
        return (None, *(f"{self.name}-{link}" for link in LINKS))  # either link's evaluation

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        gaussians = self.logits.lookup(questions) if self.logits is not None else None
        if gaussians is None:
            gaussians = self.logit_gaussians(score_fn, questions)
        if self.logits is not None:
            self.logits.record(questions, gaussians)
        width = max(len(q.choices) for q in questions)
        dtype = gaussians[0][0].dtype  # the scores' (the model's); the covariance is fp32
        if self.link == "probit":
            mean = torch.full((len(questions), width), float("-inf"), dtype=dtype)  # [B, C]; -inf: absent
            cov = torch.zeros(len(questions), width, width)  # [B, C, C]
            for b, (m, s) in enumerate(gaussians):
                mean[b, : m.shape[0]], cov[b, : m.shape[0], : m.shape[0]] = m, s
            return probit_probs(mean, cov)[None]  # [1, B, C]
        probs = torch.zeros(n_samples, len(questions), width, dtype=dtype)  # [S, B, C]
        for b, (q, (m, s)) in enumerate(zip(questions, gaussians)):
            # the draws depend on the question alone (its id and its own choices), not on its batch or process
            key = zlib.crc32(q.id.encode())
            probs[:, b, : m.shape[0]] = sample_logit_probs(
                m[None], s[None], [draw_generator(self.seed, key, i) for i in range(n_samples)])[:, 0]
        return probs

    def logit_gaussians(self, score_fn: ScoreFn, questions) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each question's GLM logits N(mean [C], cov [C, C]) over its own C choices, from one forward of the
        batch and C backward passes."""
        scores, jacobians = batch_logit_jacobians(score_fn, questions, self.linears)  # [B, C], [B, C, out, in]
        mean = scores.cpu()  # [B, C]; -inf for absent choices
        cov = logit_covariance(self.blocks, list(jacobians.values()), self.prior_precision).cpu()  # [B, C, C]
        return [(mean[b, : len(q.choices)].clone(), cov[b, : len(q.choices), : len(q.choices)].clone())
                for b, q in enumerate(questions)]


class LastLayerLaplaceMethod(LaplaceMethod):
    name = "laplace-ll"
    last_layer = True
