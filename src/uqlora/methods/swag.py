"""SWA and SWAG over the LoRA parameters (Maddox et al. 2019, "A Simple Baseline for Bayesian Uncertainty in
Deep Learning", Algorithm 1 and eq. 1; SWAG-LoRA: Onal et al. 2024, "Gaussian Stochastic Weight Averaging for
Bayesian Low-Rank Adaptation of Large Language Models").

During training, once `swag_start` of the optimizer steps are done, the flattened LoRA weights theta [P] are
collected every `swag_every` steps (default: each epoch's end), optionally at a constant `swa_lr`. The run's
adapter is the SWA mean. SWAG also keeps the second moment and the last K deviations ((K+2)*P floats) and samples
theta = theta_SWA + sqrt(scale) * (sigma * z1 / sqrt(2) + D z2 / sqrt(2(K-1))), z1 and z2 of draw s from
`draw_generator(seed, member, s)`. The sequential loop writes each draw into the LoRA weights in place; the batched
path (batched.py) stacks the draws' A and B per layer and scores S draws in one forward. The numerics live in
swag_moments.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import runs
from ..errors import UqloraError
from . import batched
from .base import Adapter, Method, ScoreFn, draw_generator
from .swag_moments import SwagMoments

SCALE_FIT_FILE = "swag-scale.json"  # posterior/ of a swag-scale run: the scale its validation NLL chose


def lora_parameters(model, adapter: str = "default") -> list[torch.nn.Parameter]:
    """The adapter's LoRA weights in model order: the flattening order of theta."""
    marker = f".{adapter}."
    return [p for n, p in model.named_parameters() if "lora_" in n and marker in n]


def flatten(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])  # [P]


@torch.no_grad()
def write_flat(params: list[torch.nn.Parameter], theta: torch.Tensor) -> None:
    """Copy theta [P] into the parameters in place (cast to their dtype and device)."""
    offset = 0
    for p in params:
        p.copy_(theta[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


class SwaMethod(Method):
    """SWA: the mean of the collected iterates is the adapter; the predictive is deterministic."""

    name = "swa"
    low_rank = False

    def on_train_start(self, model, total_steps: int, steps_per_epoch: int) -> None:
        cfg = self.config
        self.params = lora_parameters(model)
        self.start_step = int(cfg.swag_start * total_steps)
        self.every = cfg.swag_every or steps_per_epoch
        n_snapshots = sum(1 for t in range(self.start_step + 1, total_steps + 1) if t % self.every == 0)
        if n_snapshots == 0:
            raise UqloraError(f"{self.name}: no snapshot would be collected: steps {self.start_step + 1}.."
                              f"{total_steps} hold no multiple of swag_every={self.every}; lower swag_start or "
                              f"swag_every, or train longer")
        device = self.params[0].device if cfg.swag_device == "param" else torch.device("cpu")
        self.moments = SwagMoments(sum(p.numel() for p in self.params), cfg.swag_rank, device=device,
                                   low_rank=self.low_rank)

    def learning_rate(self, step: int, scheduled: float) -> float:
        if self.config.swa_lr is not None and step >= self.start_step:
            return self.config.swa_lr
        return scheduled

    def on_step_end(self, model, step: int) -> None:
        if step > self.start_step and step % self.every == 0:
            self.moments.collect(flatten(self.params))

    def on_train_end(self, model) -> None:
        if self.moments.n_collected == 0:
            raise UqloraError(f"{self.name} collected no snapshots; lower swag_start or swag_every")
        write_flat(self.params, self.moments.mean)

    def training_state(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.moments = SwagMoments.from_state_dict(state, device=self.moments.mean.device)
        except ValueError as err:
            raise UqloraError(f"checkpoint SWAG state: {err}") from None

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        """The adapter is the SWA mean; a SWAG run's posterior (evaluate --method swa) is not needed."""
        self.model, self.adapters, self.seed = model, adapters, seed

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        return torch.softmax(score_fn(questions), dim=-1)[None]  # [1, B, C]


class SwagMethod(SwaMethod):
    name = "swag"
    low_rank = True
    sampling = True
    default_samples = 10

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0, member: int = 0) -> None:
        self.model, self.adapters, self.seed, self.member = model, adapters, seed, member
        adapter = adapters[0]
        if not adapter.posterior:
            raise UqloraError("swag: the run has no posterior/swag.safetensors (was it trained with --method swag?)")
        self.params = lora_parameters(model, adapter.name)
        try:
            self.moments = SwagMoments.from_state_dict(adapter.posterior, device=self.params[0].device)
        except ValueError as err:
            raise UqloraError(f"posterior/swag.safetensors: {err}") from None
        self.scale = self.config.swag_scale if self.config is not None else 1.0
        theta = flatten(self.params).float()  # [P]: the adapter, which training set to the SWA mean
        mean = self.moments.mean
        if mean.numel() != theta.numel() or not torch.allclose(mean.to(theta.device), theta, rtol=1e-2, atol=1e-6):
            raise UqloraError(f"posterior/swag.safetensors does not match the run's adapter (P = {mean.numel()} vs "
                              f"{theta.numel()}, or its mean differs from the adapter weights): it belongs to another run")

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        if batched.sequential():
            return self.predict_in_place(score_fn, questions, n_samples)
        layers = batched.lora_linears(self.model, self.adapters[0].name)

        def score(draws: range) -> torch.Tensor:  # [len(draws), B, C]
            batch = batched.DrawBatch.seeded(questions, self.generators(draws))
            factors = self.draw_factors(layers, batch.generators)
            return batched.score_stacked(self.model, self.adapters[0].name, layers, factors, batch, score_fn)

        return batched.predict_draws(n_samples, score, self.model, questions)  # [S, B, C]

    def predict_in_place(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        """The sequential loop: each draw written into the LoRA weights in turn, one forward each; [S, B, C]."""
        draws = []
        try:
            for generator in self.generators(range(n_samples)):
                theta = self.moments.sample(self.scale, generator)  # [P]
                write_flat(self.params, theta)
                draws.append(torch.softmax(score_fn(questions), dim=-1))
        finally:
            write_flat(self.params, self.moments.mean)
        return torch.stack(draws)  # [S, B, C]

    def generators(self, draws) -> list[torch.Generator]:
        """The CPU generators of this member's posterior draws `draws`."""
        return [draw_generator(self.seed, self.member, s) for s in draws]

    def draw_factors(self, layers: dict[str, torch.nn.Module], generators: list[torch.Generator]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A [S, r, in], B [S, out, r]) of every LoRA layer of this member for the S draws whose generators are
        given, in the weights' dtype and device."""
        thetas = torch.stack([self.moments.sample(self.scale, g) for g in generators])  # [S, P]
        offsets, start = {}, 0
        for p in self.params:  # theta's layout: the parameters flattened in order
            offsets[p] = start
            start += p.numel()

        def stacked(p: torch.nn.Parameter) -> torch.Tensor:  # [S, *p.shape]
            part = thetas[:, offsets[p]:offsets[p] + p.numel()].reshape(len(generators), *p.shape)
            return part.to(device=p.device, dtype=p.dtype)

        name = self.adapters[0].name
        return {n: (stacked(m.lora_A[name].weight), stacked(m.lora_B[name].weight)) for n, m in layers.items()}


class SwagScaleMethod(SwagMethod):
    """SWAG at the covariance scale its predictive's validation NLL chose (`uqlora posthoc SWAG_RUN --method
    swag-scale`, posthoc/fit.py fit_swag_scale_run): the scale is read from posterior/swag-scale.json, not from
    swag_scale (evaluate another scale on the swag run itself). Trains, samples and saves exactly as swag."""

    name = "swag-scale"
    posthoc = True
    posterior_name = "swag"  # the SWAG state of the run it was fitted on
    fitted_scale: float | None = None

    def load_fitted(self, run_dir) -> None:
        path = Path(run_dir) / runs.POSTERIOR / SCALE_FIT_FILE
        if not path.is_file():
            raise UqloraError(f"{run_dir} has no fitted SWAG scale ({path} is missing); make it with `uqlora "
                              "posthoc SWAG_RUN --method swag-scale --out DIR`")
        value = runs.read_json(path).get("scale")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise UqloraError(f"{path}: scale must be a finite number >= 0, got {value!r}")
        self.fitted_scale = float(value)

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0, member: int = 0) -> None:
        super().bind(model, adapters, seed=seed, member=member)
        if self.fitted_scale is None:
            raise UqloraError("swag-scale: no fitted scale loaded (load_fitted was not called)")
        self.scale = self.fitted_scale
