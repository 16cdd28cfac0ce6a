"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation (Wang, Shi, Han, Metaxas & Wang, NeurIPS 2024).

Posterior ("asymmetric Bayesianization"): each LoRA layer's A [r, in] gets a diagonal Gaussian
    q(A) = N(M, Ω²),  Ω = G ∘ G  (elementwise),
with mean M the LoRA A weight itself (so the run's PEFT adapter is the posterior mean) and G [r, in] trainable,
started at G_ij ~ U(ε/√2, ε); B stays a point estimate. The update of a layer is ΔW = B A · scaling.
Prior: every entry of A is N(0, σ_p²) (the paper's low-rank prior on the full weights reduces to this prior on
A), so the KL is the closed form summed over every entry of every LoRA A:
    KL = Σ_layers Σ_ij  log(σ_p / Ω_ij) + (Ω_ij² + M_ij²) / (2 σ_p²) − 1/2.

Flipout (Wen et al. 2018, "Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches"):
a draw shares one E [r, in] ~ N(0, 1) per layer across the batch and gives example n its own sign vectors
r_n ∈ {±1}^in, s_n ∈ {±1}^r, i.e. its own weight sample A_n = M + (Ω ∘ E) ∘ (s_n r_nᵀ) ~ q, applied as
    A_n x = M x + s_n ∘ ((Ω ∘ E)(r_n ∘ x)).
The noise term is added to the output of PEFT's `lora_A` (a forward hook), whose input is the dropped-out x.
An example keeps its signs in every forward that scores it: the cloze framing's question and continuation
forwards (rows mapped to questions by framing.forward_row_owners), so each question sees one A_n throughout.
(The authors' code draws signs per token; per example is Flipout as Wen et al. define it, and makes every
draw one network per question.) Nothing is summed over tokens, so padding never counts.

Training, one weight sample per question (the paper's K = 1), with the KL re-weighted ("reweighted", BLoB's):
π_i = 2^i / (2^(M+1) − 1) for step i = 1..M of an epoch of M steps, growing through the epoch and summing to
≈ 1 (Blundell et al. 2015, §3.4); "uniform": π_i = 1/M. Two ways to optimise, `blob_kl_lr`:
- > 0 (default 0.01), the authors' implementation: each optimizer step is an AdamW step on the mean NLL of its
  S questions (train.py), then an SGD step on π_i · KL alone over M and G (`on_step_end`), at blob_kl_lr times the
  run's warm-up/decay factor, unclipped. The two objectives never share Adam's moments or the gradient clipping:
  folded into AdamW, the KL (≈ 1.15e6 nats over SmolLM2's 276,480 A entries at the start) dwarfs the NLL on an
  epoch's last steps, where π_i ≈ 1/2 (measured, OBQA, 500 questions, bf16: a last-step loss of 72,037 against
  ≈ 1.4 before), so the gradient clipping scales the NLL away there and Adam's second moments (β2 = 0.999)
  carry those steps for hundreds more, while Adam's normalised steps move G by at most ≈ lr a step: in that
  epoch mean G went from 0.043 (its start) to 0.044, so A's spread stays what ε set (BENCHMARKS.md "BLoB's KL
  step").
- 0: the KL inside the one AdamW objective, loss_n = −log p(y_n | x_n, A_n) + π_i · KL / S, so that an epoch's
  objective is the negative ELBO KL − Σ_n E_q log p(y_n | x_n, A) divided by S.
The authors' cycle length M is a heuristic of the dataset size (100·N^(π/γ)/batch, γ = 8) when they rescale;
here M is an epoch's steps (Blundell et al.'s minibatches, their code without rescaling). Defaults as in the
paper's experiments (authors' code): ε = 0.05, σ_p = 0.2, KL step lr 0.01, N = 10 samples at evaluation.

Prediction: the class probabilities averaged over N weight draws (paper: N = 10), or with `--samples 0` the
posterior mean A = M (the paper's "BLoB (N = 0)"), deterministic. Draw s takes its E and signs from its own CPU
generator `draw_generator(seed, 0, s)` (`evaluate --seed`), so the draws do not depend on the batch order, and S
draws can share one forward (batched.py): the questions replicated S times, question b of draw s is example
s·B + b with its own signs, and each layer's noise term multiplies draw s's rows by its own Ω ∘ E_s (one bmm).
Training draws from the global torch RNG, seeded by `train --seed` (and restored on --resume).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.question import Question
from ..errors import UqloraError
from ..framing import forward_row_owners
from ..schedule import lr_factor
from . import batched
from .base import Adapter, Method, ScoreFn, draw_generator
from .variational import gaussian_kl

TRAIN_ADAPTER = "default"  # the adapter name add_lora (PEFT) gives the LoRA layers it trains
G_KEY = "G"  # posterior/blob.safetensors holds "<LoRA layer name>.G" [r, in] per layer
POSTERIOR_MODULE = "blob_posterior"  # the model's submodule holding every layer's q(A)
PAPER_EVAL_SAMPLES = 10  # BLoB's N at evaluation


def lora_layers(model, adapter: str) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA layers of `adapter` by module name (those with a `lora_A[adapter]` linear)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter in m.lora_A}


def kl_weight(step: int, steps_per_epoch: int, schedule: str) -> float:
    """π_i of the 0-based optimizer step `step`: i = 1..M is its place in its epoch of M steps."""
    m = steps_per_epoch
    if schedule == "uniform":
        return 1.0 / m
    i = step % m + 1
    # 2^i / (2^(M+1) − 1) = 2^(i−M−1) / (1 − 2^−(M+1)): no overflow in long epochs (early steps give 0)
    return math.ldexp(1.0, i - m - 1) / (1.0 - math.ldexp(1.0, -m - 1))


def random_signs(shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=device).to(dtype) * 2 - 1  # ±1 (global RNG)


class Draw:
    """The noise of S posterior draws (one in training) for `n_examples` examples each: per layer and draw, E
    [r, in] shared by the draw's examples and sign vectors r [in], s [r] per example; `owners(rows)` gives the
    example [rows] (in [0, S·n)) of every row of a forward of `rows` rows. Drawn when a layer first needs them:
    from the global torch RNG (training), or from each draw's own generator (`batch`, prediction)."""

    def __init__(self, n_examples: int, owners: Callable[[int], torch.Tensor],
                 batch: batched.DrawBatch | None = None):
        self.n_examples = n_examples
        self.batch = batch
        self._owners = owners
        self._owners_by_rows: dict[int, torch.Tensor] = {}
        self.noise: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_draws(self) -> int:
        return 1 if self.batch is None else self.batch.n_draws

    def owners(self, rows: int) -> torch.Tensor:
        """The example [rows] of each row of a forward of `rows` rows (the same for every layer)."""
        if rows not in self._owners_by_rows:
            self._owners_by_rows[rows] = self._owners(rows)
        return self._owners_by_rows[rows]

    @classmethod
    def for_questions(cls, questions: list[Question]) -> "Draw":
        """One weight sample per question, in all the forwards of its framing (training: the global RNG)."""
        return cls(len(questions), lambda rows: forward_row_owners(questions, [rows])[0])

    @classmethod
    def for_batch(cls, batch: batched.DrawBatch) -> "Draw":
        """The batch's draws, one weight sample per replicated question, from the draws' own generators."""
        return cls(batch.n_questions, batch.owners, batch)

    def layer_noise(self, layer: torch.nn.Module, shape: torch.Size, device, dtype):
        """(E [S, r, in], r signs [S·n, in], s signs [S·n, r]) of `layer`, whose A has `shape` [r, in]."""
        if layer not in self.noise:
            rank, width = shape
            n, b = self.n_examples, self.batch
            if b is None:
                self.noise[layer] = (torch.randn(rank, width, device=device, dtype=dtype)[None],
                                     random_signs((n, width), device, dtype), random_signs((n, rank), device, dtype))
            else:  # each generator gives E, then r, then s, as it would alone
                self.noise[layer] = (b.normal((rank, width), device, dtype),
                                     b.signs((n, width), device, dtype).flatten(0, 1),
                                     b.signs((n, rank), device, dtype).flatten(0, 1))
        return self.noise[layer]


class VariationalA(torch.nn.Module):
    """q(A) of one LoRA layer: the mean M is its `lora_A` weight [r, in] (kept, and saved, by PEFT); this
    module holds G [r, in], Ω = G²."""

    def __init__(self, g: torch.Tensor, trainable: bool):
        super().__init__()
        self.g = torch.nn.Parameter(g, requires_grad=trainable)

    def std(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ω = G² [r, in], computed in `dtype` (default: G's)."""
        return self.g.to(dtype or self.g.dtype) ** 2

    def perturbation(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """ΔA_n x for every row of x [rows, ..., in] (row k belongs to example owners[k], and to draw owners[k] // n:
        the rows hold the draws in equal consecutive blocks): [rows, ..., r]."""
        e, r_signs, s_signs = draw.layer_noise(self, self.g.shape, x.device, x.dtype)  # E: [S, r, in]
        owners = draw.owners(x.shape[0]).to(x.device)  # [rows]
        middle = (1,) * (x.dim() - 2)  # the token axis, broadcast: an example keeps its signs at every position
        r = r_signs[owners].view(x.shape[0], *middle, -1)  # [rows, 1, in]
        s = s_signs[owners].view(x.shape[0], *middle, -1)  # [rows, 1, r]
        xr = (x * r).reshape(draw.n_draws, -1, x.shape[-1])  # [S, rows/S·T, in]: draw s's rows in block s
        out = xr @ (self.std(x.dtype) * e).transpose(1, 2)  # [S, rows/S·T, r]
        return out.reshape(*x.shape[:-1], -1) * s  # [rows, ..., r]


class BlobMethod(Method):
    name = "blob"
    sampling = True
    default_samples = PAPER_EVAL_SAMPLES
    mean_at_zero_samples = True

    def __init__(self, config=None):
        super().__init__(config)
        self.posteriors: dict[str, VariationalA] = {}  # LoRA layer name -> its q(A)
        self.lora_a: dict[str, torch.nn.Linear] = {}  # LoRA layer name -> its lora_A (weight: the mean M)
        self.draw: Draw | None = None  # the draw the LoRA layers add; None: the posterior mean
        self.step = 0  # 0-based optimizer step, for π_i

    # ---- the variational layers ----
    def _wrap(self, model, adapter: str, gs: dict[str, torch.Tensor], trainable: bool) -> None:
        """Give every LoRA layer of `adapter` its q(A) with G = gs[layer name] and the hook that adds the current
        draw's ΔA x to the output of its lora_A. The q(A) modules are registered on the model itself (so the
        optimizer and checkpoints see G) as POSTERIOR_MODULE, outside PEFT's LoRA layers: PEFT saves everything
        on those, and the run's adapter must hold only A and B."""
        if POSTERIOR_MODULE in model._modules:
            raise UqloraError("blob: the model's LoRA layers already have posteriors; wrap a model once")
        posteriors = torch.nn.ModuleDict()
        model.add_module(POSTERIOR_MODULE, posteriors)
        for name, layer in lora_layers(model, adapter).items():
            posterior = VariationalA(gs[name], trainable)
            posteriors[name.replace(".", "/")] = posterior  # a module name holds no "."
            layer.lora_A[adapter].register_forward_hook(self._noise_hook(posterior))
            self.posteriors[name], self.lora_a[name] = posterior, layer.lora_A[adapter]

    def _noise_hook(self, posterior: VariationalA):
        def add_noise(_lora_a, args, mean_out):  # args[0]: the dropped-out input x; mean_out: M x [rows, T, r]
            if self.draw is None:
                return mean_out
            return mean_out + posterior.perturbation(args[0], self.draw)
        return add_noise

    def prepare(self, model):
        """Training: wrap the fresh LoRA layers, G_ij ~ U(ε/√2, ε). Evaluation calls this on the base model
        before its adapter is loaded: nothing to wrap then (`bind` does it)."""
        layers = lora_layers(model, TRAIN_ADAPTER)
        if layers:
            eps = self.config.blob_init_g
            gs = {name: torch.empty_like(layer.lora_A[TRAIN_ADAPTER].weight).uniform_(eps / math.sqrt(2), eps)
                  for name, layer in layers.items()}  # [r, in] each
            self._wrap(model, TRAIN_ADAPTER, gs, trainable=True)
        return model

    @contextlib.contextmanager
    def drawing(self, draw: Draw):
        """The LoRA layers add `draw`'s noise to the forwards inside the block."""
        self.draw = draw
        try:
            yield
        finally:
            self.draw = None

    def scoring(self, questions: list[Question]):
        return self.drawing(Draw.for_questions(questions))

    def kl(self) -> torch.Tensor:
        """KL(q || prior) summed over every entry of every LoRA A, in float64 (a scalar with its graph)."""
        prior_std = self.config.blob_prior_std
        return sum(gaussian_kl(self.lora_a[name].weight.double(), q.std(torch.float64), prior_std).sum()
                   for name, q in self.posteriors.items())

    # ---- training ----
    def on_train_start(self, model, total_steps: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.step_questions = self.config.batch_size * self.config.grad_accum  # S
        self.total_steps, self.warmup = total_steps, round(self.config.warmup_ratio * total_steps)

    def learning_rate(self, step: int, scheduled: float) -> float:
        """Called before each optimizer step's forwards: it tells the step index π_i needs (also on --resume)."""
        self.step = step
        return scheduled

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(scores, labels, reduction="none")  # [B]
        if self.config.blob_kl_lr > 0:  # the KL takes its own step (on_step_end)
            return nll
        beta = kl_weight(self.step, self.steps_per_epoch, self.config.blob_kl_schedule) / self.step_questions
        return nll + (beta * self.kl()).to(nll.dtype)  # [B]

    @torch.no_grad()
    def on_step_end(self, model, step: int) -> None:
        """The KL's SGD step after optimizer step `step` (1-based): M, G -= kl_lr · factor · π_i ∇(KL)."""
        if self.config.blob_kl_lr == 0:
            return
        done = step - 1  # the 0-based step just taken
        weight = kl_weight(done, self.steps_per_epoch, self.config.blob_kl_schedule)
        lr = self.config.blob_kl_lr * lr_factor(done, self.total_steps, self.warmup)
        params = [p for name in self.posteriors for p in (self.lora_a[name].weight, self.posteriors[name].g)]
        with torch.enable_grad():
            grads = torch.autograd.grad(weight * self.kl(), params)
        for p, g in zip(params, grads):
            p.sub_(g.to(p.dtype), alpha=lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{G_KEY}": q.g.detach().to("cpu", copy=True).contiguous()
                for name, q in self.posteriors.items()}  # [r, in] each

    def training_state(self) -> dict[str, torch.Tensor]:
        """Nothing beyond the model: G is a trainable parameter (in every checkpoint), π_i follows the step."""
        return {}

    # ---- evaluation ----
    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        """Wrap the loaded adapter's LoRA layers with the run's G, refusing a posterior of other layers."""
        self.model, self.adapters, self.seed = model, adapters, seed
        adapter = adapters[0]
        if not adapter.posterior:
            raise UqloraError("blob: the run has no posterior/blob.safetensors (was it trained with --method blob?)")
        layers = lora_layers(model, adapter.name)
        expected = {f"{n}.{G_KEY}": tuple(m.lora_A[adapter.name].weight.shape) for n, m in layers.items()}
        found = {k: tuple(v.shape) for k, v in adapter.posterior.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()))[:2]
            raise UqloraError(f"posterior/blob.safetensors does not match the run's adapter: its G tensors must "
                              f"be one [r, in] per LoRA layer (first differences {diff}); it belongs to another run")
        gs = {}
        for name, layer in layers.items():
            weight = layer.lora_A[adapter.name].weight  # [r, in]
            gs[name] = adapter.posterior[f"{name}.{G_KEY}"].to(device=weight.device, dtype=weight.dtype)
            if not torch.isfinite(gs[name]).all():
                raise UqloraError(f"posterior/blob.safetensors: {name}.{G_KEY} has non-finite values")
        self._wrap(model, adapter.name, gs, trainable=False)

    def predict(self, score_fn: ScoreFn, questions: list[Question], n_samples: int) -> torch.Tensor:
        if n_samples == 0:
            return torch.softmax(score_fn(questions), dim=-1)[None]  # [1, B, C]: A = M, deterministic

        def score(draws: range) -> torch.Tensor:  # [len(draws), B, C]
            batch = batched.DrawBatch.seeded(questions, [draw_generator(self.seed, 0, s) for s in draws])
            with self.drawing(Draw.for_batch(batch)):
                return batched.score_draws(score_fn, batch)

        return batched.predict_draws(n_samples, score, self.model, questions)  # [S, B, C]
