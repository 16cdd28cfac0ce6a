"""Deep ensembles of LoRA adapters (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty
Estimation using Deep Ensembles", eq. 2) and MultiSWAG (Wilson & Izmailov 2020, "Bayesian Deep Learning and a
Probabilistic Perspective of Generalization", sec. 3.3: a mixture of M SWAG Gaussians).

Member m is an independent run of the member method with seed `seed + m` (its own LoRA initialisation and data
order); all M adapters sit on one frozen base model and are switched with PEFT's `set_adapter`. The predictive is
the mean of the members' probabilities, each member counted once (MultiSWAG: M x S draws)."""

from __future__ import annotations

import torch

from ..errors import UqloraError
from .base import Adapter, Method, ScoreFn
from .swag import SwagMethod


def _check_members(adapters: list[Adapter]) -> None:
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UqloraError(f"an ensemble must not hold one member twice: adapters {names}")


class EnsembleMethod(Method):
    name = "ensemble"
    member_method = "map"

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        _check_members(adapters)
        super().bind(model, adapters, seed=seed)

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        draws = []
        for adapter in self.adapters:
            self.model.set_adapter(adapter.name)
            draws.append(torch.softmax(score_fn(questions), dim=-1))
        return torch.stack(draws)  # [M, B, C]


class MultiSwagMethod(Method):
    name = "multiswag"
    member_method = "swag"
    sampling = True
    default_samples = SwagMethod.default_samples  # per member

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        _check_members(adapters)
        self.model, self.adapters, self.seed = model, adapters, seed
        self.members = []
        for m, adapter in enumerate(adapters):
            member = SwagMethod(self.config)
            member.bind(model, [adapter], seed=seed, member=m)
            self.members.append(member)

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        draws = []
        for adapter, member in zip(self.adapters, self.members):
            self.model.set_adapter(adapter.name)
            draws.append(member.predict(score_fn, questions, n_samples))  # [S, B, C]
        return torch.cat(draws)  # [M * S, B, C]
