"""Batched posterior sampling: S posterior draws of the LoRA weights evaluated in one forward (docs/sampling.md).

A sampling method's predictive needs the class probabilities of S draws [S, B, C]. One draw per forward (the
sequential loop) runs the base model S times on the same B questions; here the B questions are replicated S
times, draw-major, and `score_fn` scores the S·B questions in one call: replicated question s·B + b is question b
under draw s. Every forward the framing makes then has rows that fall into S equal consecutive blocks, one per
draw (framing.forward_row_owners gives each row's question q, its draw is q // B; `DrawBatch.block_rows` checks
that every forward's rows are those of the replicated questions). The base weights W0 act on all rows in one
matmul; what differs between draws is applied per block:
- weights (SWAG, MultiSWAG, deep ensembles): every LoRA layer's lora_A and lora_B are swapped, for the call, for
  `StackedLinear`s holding A [S, r, in] and B [S, out, r]; block s is multiplied by its own A_s, B_s (torch.bmm),
  so the layer adds scaling · B_s A_s x to the rows of draw s;
- noise (MC dropout, BLoB, C-LoRA): draw s's block takes its random numbers from its own CPU generator
  `draw_generator(seed, member, s)` (`DrawBatch.normal`, `signs`, `keep_mask`).

Equality: a draw's weights, or its noise, depend only on (seed, member, s) and the shapes of that draw's own
forward, which are the same in a batched call (every block is a copy of the B questions, padded alike) as alone.
So the batched predictive equals the sequential loop's up to float rounding, whatever the chunking, and does not
depend on the batch order either: the generators start afresh for every batch of questions.

How many draws share one forward (`sample_batching`, `uqlora evaluate --sample-batch N`): N = 1 is the sequential
loop (also what `Method.predict` does outside `predict_probs`); N > 1 chunks of N draws, on the CPU no more than
an estimate of their activation memory (`draw_bytes`) allows in RAM_FRACTION of the available RAM (there an
allocation that does not fit ends the process rather than raising); 0 (auto, predict_probs' default): on CUDA
all S at once, halved on `torch.cuda.OutOfMemoryError` (and remembered for the rest of the call); on the CPU one
draw per forward, since batching saves no arithmetic and measured slower there (BENCHMARKS.md: 0.84x with two
threads, 0.73x with one, SmolLM2-135M on an idle 2-core machine).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..data.question import Question
from ..errors import UqloraError
from ..framing import forward_row_owners, letter_prompt

SEQUENTIAL = 1  # draws per forward of the sequential loop
AUTO = 0  # sample batch size chosen for the device: CUDA as many as fit, CPU one


@dataclass
class SampleBatching:
    """How many posterior draws share a forward: `size` (AUTO, SEQUENTIAL or a fixed N); `tokenizer` (optional)
    counts the tokens of the CPU memory estimate; `cuda_limit` is the largest chunk that fitted on CUDA so far
    (auto mode halves it on out-of-memory)."""

    size: int
    tokenizer: object | None = None
    cuda_limit: int | None = None


_SETTING: contextvars.ContextVar[SampleBatching] = contextvars.ContextVar(
    "sample_batching", default=SampleBatching(SEQUENTIAL))


@contextlib.contextmanager
def sample_batching(size: int, tokenizer=None) -> Iterator[None]:
    """Within the block, sampling methods evaluate `size` draws per forward (AUTO: CUDA as many as fit, CPU one;
    on the CPU a larger `size` is capped by the memory estimate, which counts tokens with `tokenizer` if given,
    else bounds them by bytes)."""
    if size < 0:
        raise UqloraError(f"--sample-batch must be >= 0 (0: automatic, 1: one draw per forward), got {size}")
    token = _SETTING.set(SampleBatching(size, tokenizer))
    try:
        yield
    finally:
        _SETTING.reset(token)


def sequential() -> bool:
    """True when draws are evaluated one per forward (the sequential loop, the batched path's oracle)."""
    return _SETTING.get().size == SEQUENTIAL


# ------------------------------------------------------------------------------------------------ draws and rows
class DrawBatch:
    """S draws of B questions evaluated in one call of score_fn on `self.questions` (the B questions repeated once
    per draw, draw-major); `generators[s]` is the CPU generator of the call's s-th draw (methods that draw noise)."""

    def __init__(self, questions: list[Question], n_draws: int, generators: list[torch.Generator] | None = None):
        if generators is not None and len(generators) != n_draws:
            raise ValueError(f"{len(generators)} generators for {n_draws} draws")
        self.n_draws = n_draws
        self.n_questions = len(questions)
        self.questions = list(questions) * n_draws  # [S·B]: question b under draw s at s·B + b
        self.generators = generators
        self._owners: dict[int, torch.Tensor] = {}

    @classmethod
    def seeded(cls, questions: list[Question], generators: list[torch.Generator]) -> "DrawBatch":
        """One draw per generator."""
        return cls(questions, len(generators), generators)

    def owners(self, rows: int) -> torch.Tensor:
        """The replicated question [rows] (in [0, S·B)) of every row of a forward of `rows` rows. The framings
        order a forward's rows by question (forward_row_owners), so the rows of draw s form block s of rows / S."""
        if rows not in self._owners:
            try:
                self._owners[rows] = forward_row_owners(self.questions, [rows])[0]  # [rows]
            except UqloraError as err:
                raise UqloraError(f"batched sampling: {err}; score the draws one per forward (--sample-batch 1)"
                                  ) from None
        return self._owners[rows]

    def block_rows(self, rows: int) -> int:
        """Rows per draw of a forward of `rows` rows (checked to be the rows of the replicated questions)."""
        self.owners(rows)
        return rows // self.n_draws

    def _each(self, fill: Callable[[torch.Tensor, torch.Generator], torch.Tensor], shape: tuple[int, ...], device,
              dtype) -> torch.Tensor:
        """[S, *shape]: slice s filled in place by fill(slice, generator of draw s), on the CPU in float32 (the same
        numbers on any device), then moved."""
        if self.generators is None:
            raise ValueError("this batch of draws has no generators: its method draws no noise")
        out = torch.empty(self.n_draws, *shape)
        for view, generator in zip(out, self.generators):
            fill(view, generator)
        return out.to(device=device, dtype=dtype)

    def normal(self, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        """N(0, 1) numbers [S, *shape], slice s from draw s's generator."""
        return self._each(lambda v, g: v.normal_(generator=g), shape, device, dtype)

    def signs(self, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        """Uniform ±1 [S, *shape], slice s from draw s's generator."""
        return self._each(lambda v, g: v.random_(0, 2, generator=g).mul_(2).sub_(1), shape, device, dtype)

    def keep_mask(self, shape: tuple[int, ...], keep: float, device, dtype) -> torch.Tensor:
        """Bernoulli(keep) 0/1 numbers [S, *shape], slice s from draw s's generator."""
        return self._each(lambda v, g: v.bernoulli_(keep, generator=g), shape, device, dtype)

    def per_row(self, sample: Callable, shape: torch.Size, *args) -> torch.Tensor:
        """Numbers for a forward's tensor of `shape` [rows, ...]: each draw's block of rows from its generator
        (`sample` is `normal`, `signs` or `keep_mask`; `args` its further arguments)."""
        block = (self.block_rows(shape[0]), *shape[1:])
        return sample(block, *args).flatten(0, 1)  # [S, rows/S, ...] -> [rows, ...]


def score_draws(score_fn, batch: DrawBatch) -> torch.Tensor:
    """Class probabilities [S, B, C] of the batch's draws from one call of score_fn on the replicated questions."""
    scores = score_fn(batch.questions)  # [S·B, C]
    return torch.softmax(scores, dim=-1).view(batch.n_draws, batch.n_questions, -1)


# ------------------------------------------------------------------------------------------------ LoRA layers
def lora_linears(model, adapter: str) -> dict[str, nn.Module]:
    """The PEFT LoRA linear layers holding `adapter`, by module name; other LoRA layer kinds are refused."""
    from peft.tuners.lora import Linear, LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
    other = [n for n, m in layers.items() if not isinstance(m, Linear) or adapter in m.lora_variant]
    if other:
        raise UqloraError(f"batched sampling handles plain LoRA linear layers only, not {other[:2]}; "
                          f"use --sample-batch 1")
    return layers


class StackedLinear(nn.Module):
    """S bias-free linear maps, one per draw: block s of the input rows [S·R, ..., in] goes through weight[s].
    `weight` [S, out, in] stands in for a LoRA layer's lora_A or lora_B (PEFT reads its dtype)."""

    def __init__(self, weight: torch.Tensor, batch: DrawBatch):
        super().__init__()
        self.weight = weight  # [S, out, in]
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch.block_rows(x.shape[0])
        s, width = self.weight.shape[0], x.shape[-1]
        out = torch.bmm(x.reshape(s, -1, width), self.weight.transpose(1, 2))  # [S, R·T, out]
        return out.reshape(*x.shape[:-1], out.shape[-1])  # [S·R, ..., out]


class SeededDropout(nn.Module):
    """Inverted dropout whose mask for block s of the rows comes from draw s's generator (x * mask / keep)."""

    def __init__(self, p: float, batch: DrawBatch):
        super().__init__()
        self.keep = 1.0 - p
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.batch.per_row(self.batch.keep_mask, x.shape, self.keep, x.device, x.dtype)  # [rows, ..., in]
        return x * mask.div_(self.keep)


@contextlib.contextmanager
def swapped(entries: list[tuple[nn.ModuleDict, str, nn.Module]]) -> Iterator[None]:
    """Put module[key] = replacement for every (ModuleDict, key, replacement) inside the block; the original
    modules come back afterwards, also on an exception (a ModuleDict keeps the key's place)."""
    originals = [(modules, key, modules[key]) for modules, key, _ in entries]
    try:
        for modules, key, replacement in entries:
            modules[key] = replacement
        yield
    finally:
        for modules, key, original in originals:
            modules[key] = original


def stacked_lora(layers: dict[str, nn.Module], adapter: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 batch: DrawBatch):
    """The context in which every LoRA layer of `adapter` applies, to draw s's rows, its factors
    factors[name] = (A [S, r, in], B [S, out, r]) of the batch's draws, at its own scaling."""
    entries = []
    for name, layer in layers.items():
        a, b = factors[name]
        entries += [(layer.lora_A, adapter, StackedLinear(a, batch)), (layer.lora_B, adapter, StackedLinear(b, batch))]
    return swapped(entries)


def score_stacked(model, adapter: str, layers: dict[str, nn.Module], factors, batch: DrawBatch, score_fn
                  ) -> torch.Tensor:
    """[S, B, C] of the batch's draws from one forward in which their stacked LoRA factors (`stacked_lora`) take
    the place of `adapter`, made the active adapter for the call."""
    with active_adapter(model, adapter), stacked_lora(layers, adapter, factors, batch):
        return score_draws(score_fn, batch)


def score_dropped(layers: dict[str, nn.Module], adapter: str, batch: DrawBatch, score_fn) -> torch.Tensor:
    """[S, B, C] of the batch's MC dropout draws from one forward: every LoRA dropout of `adapter` is swapped for
    a SeededDropout of the same p (in training mode: the one dropout that drops) for the call."""
    entries = []
    for layer in layers.values():
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            entries.append((layer.lora_dropout, adapter, SeededDropout(dropout.p, batch).train()))
    with swapped(entries):
        return score_draws(score_fn, batch)


@contextlib.contextmanager
def active_adapter(model, adapter: str) -> Iterator[None]:
    """`adapter` is the PEFT model's active adapter inside the block; the one active before comes back, and so do
    the parameters' requires_grad flags (PEFT's set_adapter makes the active adapter trainable)."""
    before = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(before)
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ chunking
def predict_draws(n_draws: int, score: Callable[[range], torch.Tensor], model, questions: list[Question]
                  ) -> torch.Tensor:
    """[n_draws, B, C]: score(draws) gives [len(draws), B, C] for a range of draws evaluated in one forward; the
    draws are split into chunks of the current sample batch size (auto: from the memory)."""
    setting = _SETTING.get()
    on_cuda = next(model.parameters()).device.type == "cuda"
    if setting.size == AUTO and on_cuda:
        return _halving_on_oom(n_draws, score, setting)
    size = SEQUENTIAL if setting.size == AUTO else setting.size
    if size > SEQUENTIAL and not on_cuda:
        size = min(size, cpu_draw_limit(model, questions, setting.tokenizer))
    return torch.cat([score(range(i, min(i + size, n_draws))) for i in range(0, n_draws, size)])


def _halving_on_oom(n_draws: int, score: Callable[[range], torch.Tensor], setting: SampleBatching) -> torch.Tensor:
    """Chunks as large as fit on CUDA: the first try holds every draw left, each out-of-memory halves it."""
    out, start = [], 0
    while start < n_draws:
        size = min(n_draws - start, setting.cuda_limit or n_draws)
        try:
            out.append(score(range(start, start + size)))
            start += size
            continue
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
        setting.cuda_limit = size // 2  # outside the except block: its traceback no longer holds the tensors
        torch.cuda.empty_cache()
    return torch.cat(out)


RAM_FRACTION = 0.5  # of the available RAM that the draws of one forward may take (the rest: other processes)
LOGIT_COPIES = 3  # the continuation logits live as the model's output, its float32 copy and its log-softmax
BOS_TOKENS = 2  # special tokens a tokenizer may add to a prompt


def _token_counts(questions: list[Question], tokenizer) -> tuple[int, int]:
    """(Lp, Lc): the tokens of the longest letter prompt (stem and every choice: no shorter than the cloze prompt)
    and of the longest " choice"; without a tokenizer their UTF-8 bytes bound them (a BPE token covers at least
    one byte), plus BOS_TOKENS and the space."""
    if tokenizer is None:
        return (max(len(letter_prompt(q).encode()) for q in questions) + BOS_TOKENS,
                max(len(c.encode()) for q in questions for c in q.choices) + 1)
    return (max(len(tokenizer.encode(letter_prompt(q))) for q in questions),
            max(len(tokenizer.encode(f" {c}", add_special_tokens=False)) for q in questions for c in q.choices))


def draw_bytes(model, questions: list[Question], tokenizer=None) -> int:
    """An estimate, from above, of the activation memory one draw of `questions` adds to a forward of either
    framing. With Lp and Lc the tokens of the longest prompt and choice (`_token_counts`; prompts are taken
    untruncated) and K = Σ choices over the B questions, the terms are
      KV cache     2 · layers · kv_heads · head_dim · elem  per position, over B·Lp question positions and
                   K·(Lp + Lc) continuation positions (cloze copies its question's cache to each continuation);
      logits       LOGIT_COPIES · 4 · vocab per continuation position, K·Lc (letter keeps one per question);
      one layer    (4 · hidden + 3 · intermediate) · elem per position (residual, q/k/v/o; gate, up, product),
                   2 · heads · head_dim · elem per key position (keys and values repeated to every query head)
                   and heads · 4 bytes of attention scores per query and key position, for the larger forward.
    """
    config = model.config.get_text_config()
    elem = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    lp, lc = _token_counts(questions, tokenizer)
    b, k = len(questions), sum(len(q.choices) for q in questions)
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim * elem * (b * lp + k * (lp + lc))
    logits = LOGIT_COPIES * 4 * config.vocab_size * k * lc
    positions, keys = max(b * lp, k * lc), max(b * lp, k * (lp + lc))
    scores = max(b * lp * lp, k * lc * (lp + lc))
    layer = ((4 * config.hidden_size + 3 * config.intermediate_size) * elem * positions
             + 2 * heads * head_dim * elem * keys + heads * 4 * scores)
    return cache + logits + layer


def cpu_draw_limit(model, questions: list[Question], tokenizer=None) -> int:
    """How many draws of `questions` one CPU forward may hold: RAM_FRACTION of the available RAM / draw_bytes."""
    import psutil

    return max(1, int(RAM_FRACTION * psutil.virtual_memory().available // draw_bytes(model, questions, tokenizer)))
