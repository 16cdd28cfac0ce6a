"""Deep ensembles of LoRA adapters (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty
Estimation using Deep Ensembles", eq. 2) and MultiSWAG (Wilson & Izmailov 2020, "Bayesian Deep Learning and a
Probabilistic Perspective of Generalization", sec. 3.3: a mixture of M SWAG Gaussians).

Member m is an independent run of the member method with seed `seed + m` (its own LoRA initialisation and data
order); all M adapters sit on one frozen base model and are switched with PEFT's `set_adapter`. The predictive is
the mean of the members' probabilities, each member counted once (MultiSWAG: M x S draws, member-major: draw
m·S + s is draw s of member m, from `draw_generator(seed, m, s)`).

Sequential loop: `set_adapter` to each member in turn, one forward per member (MultiSWAG: per member draw). Batched
(batched.py): the members are the draws: their A and B are stacked per layer and put in the first member's place
for the call, so the M members (M·S MultiSWAG draws) are scored in one forward, in chunks if memory asks."""

from __future__ import annotations

import itertools

import torch

from ..errors import UqloraError
from . import batched
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
        if batched.sequential():
            draws = []
            for adapter in self.adapters:
                self.model.set_adapter(adapter.name)
                draws.append(torch.softmax(score_fn(questions), dim=-1))
            return torch.stack(draws)  # [M, B, C]
        layers = member_layers(self.model, self.adapters)

        def score(members: range) -> torch.Tensor:  # [len(members), B, C]
            batch = batched.DrawBatch(questions, len(members))
            factors = {n: tuple(torch.stack([getattr(layer, f"lora_{ab}")[self.adapters[m].name].weight
                                             for m in members]) for ab in "AB")
                       for n, layer in layers.items()}  # (A [M', r, in], B [M', out, r]) per layer
            return batched.score_stacked(self.model, self.adapters[0].name, layers, factors, batch, score_fn)

        return batched.predict_draws(len(self.adapters), score, self.model, questions)  # [M, B, C]


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
        if batched.sequential():
            draws = []
            for adapter, member in zip(self.adapters, self.members):
                self.model.set_adapter(adapter.name)
                draws.append(member.predict(score_fn, questions, n_samples))  # [S, B, C]
            return torch.cat(draws)  # [M * S, B, C]
        layers = member_layers(self.model, self.adapters)

        def score(draws: range) -> torch.Tensor:  # [len(draws), B, C]: flat draw i is draw i % S of member i // S
            by_member = [(m, [i % n_samples for i in group])
                         for m, group in itertools.groupby(draws, key=lambda i: i // n_samples)]
            generators = [self.members[m].generators(ss) for m, ss in by_member]
            batch = batched.DrawBatch.seeded(questions, [g for gs in generators for g in gs])
            parts = [self.members[m].draw_factors(layers, gs) for (m, _), gs in zip(by_member, generators)]
            factors = {n: (torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts])) for n in layers}
            return batched.score_stacked(self.model, self.adapters[0].name, layers, factors, batch, score_fn)

        return batched.predict_draws(len(self.adapters) * n_samples, score, self.model, questions)  # [M·S, B, C]


def member_layers(model, adapters: list[Adapter]) -> dict[str, torch.nn.Module]:
    """The LoRA layers every member adapts (the same modules hold all members), refusing members whose layers,
    shapes or scalings differ: their draws could not share one forward."""
    layers = batched.lora_linears(model, adapters[0].name)
    for adapter in adapters[1:]:
        other = batched.lora_linears(model, adapter.name)
        same = other.keys() == layers.keys() and all(
            layer.scaling[adapter.name] == layer.scaling[adapters[0].name]
            and layer.lora_A[adapter.name].weight.shape == layer.lora_A[adapters[0].name].weight.shape
            for layer in layers.values())
        if not same:
            raise UqloraError(f"ensemble members {adapters[0].name} and {adapter.name} adapt different layers, ranks "
                              f"or scalings; score them one per forward (--sample-batch 1)")
    return layers

