"""K-FAC curvature of the C answer logits w.r.t. every LoRA A and B matrix, and the GLM logit covariance.

Laplace-LoRA (Yang, Robeyns, Wang, Aitchison, ICLR 2024, §3-4): a Laplace approximation over the LoRA
parameters with a Kronecker-factored GGN, block-diagonal across the LoRA linears (Ritter et al. 2018).

GGN of the softmax likelihood for one question (Martens 2020, eq. 19): J^T Λ J with J [C, P] the Jacobian of
the C class scores and Λ = diag(p) - p p^T. Λ = L L^T with L = diag(√p) - p √p^T (checked by multiplying out,
using Σ p = 1), so the GGN is Σ_k v_k v_k^T with pseudo-gradients v_k = J^T L[:, k]: one backward pass of
scores · L[:, k] per class k (`ggn`, exact). `fisher` draws one label y ~ p per question and uses
v = J^T (e_y - p), whose expectation over y is the same matrix (one backward pass).

Weight sharing over token positions is handled as K-FAC-expand (Eschenhagen et al. 2023, eq. 9): with a_t the
layer input and g_t the pseudo-gradient w.r.t. its output at position t, the block of a weight [out, in] is
    H ≈ (Σ_{n,k,t} g g^T) ⊗ (1/M Σ_{n,t} a a^T),
over the M positions that influence the scores (where some g_t is more than round-off, ROUND_OFF; padding and
unscored positions have zero gradient, or round-off where terms cancel, and are left out). It is exact for one
question with one position.
"""

from __future__ import annotations

import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.question import Question
from ..errors import UqloraError
from .kfac import FactorAccumulator, KronBlock, block_quadratic

CURVATURES = ("ggn", "fisher")
# Output gradients below this fraction of a backward pass's largest are round-off of terms that cancel (float32's
# relative precision is 1.2e-7; the cancellation residues measured on the tiny test model were ~1e-8 of the largest).
ROUND_OFF = 1e-5
LAYER_INDEX = re.compile(r"\.(\d+)\.")  # the block number in names such as model.layers.29.self_attn.q_proj


def lora_linears(model, adapter: str = "default", last_layer: bool = False) -> dict[str, torch.nn.Linear]:
    """The LoRA A and B linears of `adapter`, in model order: {"<module>.lora_A": Linear [r, in], ...}.

    last_layer: only the LoRA linears of the deepest transformer block that has any (laplace-ll)."""
    found = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            found[f"{name}.lora_A"] = lora_a[adapter]
            found[f"{name}.lora_B"] = lora_b[adapter]
    if not found:
        raise UqloraError(f"the model has no LoRA layers of adapter {adapter!r}: a Laplace posterior needs a "
                          "LoRA run (map, mc-dropout or swa)")
    if last_layer:
        depth = [int(m[-1]) if (m := LAYER_INDEX.findall(n)) else -1 for n in found]
        deepest = max(depth)
        found = {n: m for n, m, d in zip(found, found.values(), depth) if d == deepest}
        if deepest < 0:  # no numbered blocks: the last LoRA module (its A and B)
            found = dict(list(found.items())[-2:])
    for name, linear in found.items():
        if linear.bias is not None:
            raise UqloraError(f"{name} has a bias; the K-FAC blocks here cover LoRA weights without bias")
    return found


class _Recorder:
    """Forward hooks keep each call's input a [..., in]; a hook on the output keeps its gradient g [..., out]."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.linears = linears
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.grads: dict[str, dict[int, torch.Tensor]] = {n: {} for n in linears}
        self.handles = []

    def _forward_hook(self, name):
        def hook(_module, args, output):
            call = len(self.inputs[name])
            self.inputs[name].append(args[0].detach())
            if output.requires_grad:
                output.register_hook(lambda g: self.grads[name].__setitem__(call, g.detach()))
        return hook

    @contextmanager
    def attached(self):
        self.handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.linears.items()]
        try:
            yield self
        finally:
            for h in self.handles:
                h.remove()

    def clear_inputs(self) -> None:
        for name in self.linears:
            self.inputs[name].clear()
            self.grads[name].clear()


@dataclass
class KfacFit:
    blocks: dict[str, KronBlock]
    positions: dict[str, int]  # M per linear: positions that influence the scores
    questions: int
    log_likelihood: float  # Σ log p(label) of the fitted questions at the MAP (the Laplace evidence's first term)
    factor_seconds: float  # of the total, the final eigendecompositions of the factors


def pseudo_targets(scores: torch.Tensor, curvature: str, generators: list[torch.Generator]) -> torch.Tensor:
    """Vectors u_k [K, B, C] such that Σ_k J^T u_k u_k^T J is the GGN (`ggn`, K = C) or its one-label estimate
    (`fisher`, K = 1: question b's label drawn with generators[b]). Absent choices (score -inf) have probability 0
    and get 0."""
    probs = torch.softmax(scores.detach().float(), dim=-1)  # [B, C]
    if curvature == "ggn":
        eye = torch.eye(scores.shape[1], device=probs.device)  # [C, C]
        return probs.sqrt().T[:, :, None] * (eye[:, None, :] - probs[None, :, :])  # [C, B, C]: √p_k (e_k - p)
    if curvature == "fisher":
        labels = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.cpu(), generators)])  # [B]
        return (torch.nn.functional.one_hot(labels.to(probs.device), scores.shape[1]).float() - probs)[None]
    raise UqloraError(f"curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}")


def label_generator(seed: int, question: Question) -> torch.Generator:
    """The generator of a question's `fisher` label: it depends on the seed and the question, not on its batch or
    process, so any number of processes draws the same labels."""
    state = np.random.SeedSequence([seed, zlib.crc32(question.id.encode())]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def fit_kfac(model, linears: dict[str, torch.nn.Linear], score_fn, questions: list[Question], *, curvature: str,
             batch_size: int, max_full_dim: int, rank: int, seed: int, quiet: bool = False,
             accelerator=None) -> KfacFit:
    """Accumulate the K-FAC factors of every linear over `questions` (the model in eval mode: no dropout).

    With an accelerator of N processes each process accumulates over its strided share of the questions, then the
    factors, position counts and log-likelihoods are summed over the processes (`FactorAccumulator.merge`): every
    process returns the same fit, which equals one process's up to float summation order (and, for low-rank sides,
    the truncations: see `merge`)."""
    device = next(iter(linears.values())).weight.device
    acc_a = {n: FactorAccumulator(m.in_features, max_full_dim=max_full_dim, rank=rank, device=device)
             for n, m in linears.items()}
    acc_g = {n: FactorAccumulator(m.out_features, max_full_dim=max_full_dim, rank=rank, device=device)
             for n, m in linears.items()}
    process, processes = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    bar = tqdm(total=len(questions), desc=f"K-FAC ({curvature})", disable=quiet or process > 0, leave=False)
    log_lik = 0.0
    was_training = model.training
    model.eval()
    mine = questions[process::processes]
    for start in range(0, len(mine), batch_size):
        log_lik += _accumulate_batch(linears, score_fn, mine[start:start + batch_size], curvature, seed, acc_a, acc_g)
        bar.update(min(batch_size, len(mine) - start) * processes)
    bar.close()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if processes > 1:
        log_lik = float(accelerator.reduce(torch.tensor([log_lik], dtype=torch.float64, device=device), "sum"))
        for acc in (*acc_a.values(), *acc_g.values()):
            _merge_processes(acc, accelerator)
    blocks, positions = {}, {}
    start = time.perf_counter()
    for n in linears:
        positions[n] = acc_a[n].rows_seen
        if positions[n] == 0:
            raise UqloraError(f"{n}: no position influenced the scores; the K-FAC factor is empty")
        blocks[n] = KronBlock(A=acc_a[n].factor().scaled(1.0 / positions[n]), G=acc_g[n].factor())
    return KfacFit(blocks, positions, len(questions), log_lik, time.perf_counter() - start)


def _accumulate_batch(linears, score_fn, batch: list[Question], curvature: str, seed: int, acc_a, acc_g) -> float:
    """Add one batch's rows to the factors (a from the forward hooks, g from one backward pass per pseudo-target);
    returns the batch's Σ log p(label)."""
    recorder = _Recorder(linears)
    with recorder.attached(), torch.enable_grad():
        scores = score_fn(batch)  # [B, C]
        labels = torch.tensor([q.label for q in batch], device=scores.device)
        log_lik = float(-torch.nn.functional.cross_entropy(scores.detach().float(), labels, reduction="sum"))
        finite = scores.masked_fill(~torch.isfinite(scores), 0.0)  # -inf * 0 would be nan
        targets = pseudo_targets(scores, curvature, [label_generator(seed, q) for q in batch])  # [K, B, C]
        active = {n: [None] * len(recorder.inputs[n]) for n in linears}
        for k in range(targets.shape[0]):
            for n in linears:
                recorder.grads[n].clear()
            (finite * targets[k]).sum().backward(retain_graph=k + 1 < targets.shape[0])
            for n in linears:
                grads = {call: g.reshape(-1, g.shape[-1]).float() for call, g in recorder.grads[n].items()}
                for call, nonzero in _influencing_rows(grads).items():
                    acc_g[n].add(grads[call][nonzero])
                    active[n][call] = nonzero if active[n][call] is None else active[n][call] | nonzero
        for n in linears:
            for call, a in enumerate(recorder.inputs[n]):
                if active[n][call] is not None:
                    acc_a[n].add(a.reshape(-1, a.shape[-1]).float()[active[n][call]])
    recorder.clear_inputs()
    return log_lik


def _influencing_rows(grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """For one backward pass, the positions [positions] bool of each call's output gradients [positions, out]
    that influence the scores: a gradient above ROUND_OFF times the pass's largest. Positions that cannot reach
    the scores get exactly 0 or, where terms cancel (e.g. choices sharing their first token), float round-off
    that is exactly 0 or not depending on the last bits of the weights and on the batching: counting it would make
    the input factor (its positions M) depend on how the questions are shared among processes."""
    size = {call: g.abs().amax(-1) for call, g in grads.items()}  # [positions] each
    largest = max((float(m.max()) for m in size.values() if m.numel()), default=0.0)
    return {call: m > ROUND_OFF * largest for call, m in size.items()}


def _merge_processes(acc: FactorAccumulator, accelerator) -> None:
    """Replace every process's accumulator by the sum over the processes (gathered in process order)."""
    gathered = {k: accelerator.gather(v[None]) for k, v in acc.summary().items()}  # [N, ...] each
    acc.merge([{k: v[p] for k, v in gathered.items()} for p in range(accelerator.num_processes)])


def logit_jacobians(score_fn, question: Question, params: list[torch.Tensor]):
    """Scores [C] of one question and the Jacobian rows of its present choices: one [C', *param.shape] per
    parameter (C' = the question's choices), by C' backward passes through one forward (autograd on the
    weights: the reference `batch_logit_jacobians` is tested against)."""
    with torch.enable_grad():
        scores = score_fn([question])[0]  # [C]
        n = len(question.choices)
        rows = [torch.autograd.grad(scores[c], params, retain_graph=c + 1 < n) for c in range(n)]
    return scores.detach().float(), [torch.stack([r[i] for r in rows]).float() for i in range(len(params))]


def batch_logit_jacobians(score_fn, questions: list[Question], linears: dict[str, torch.nn.Linear]):
    """Scores [B, C] and per-question Jacobians {linear: [B, C, out, in]} (fp32) from one forward of the batch
    and C backward passes: hooks keep each row's input a and output gradient g, a row's Jacobian is Σ_t g a^T,
    and rows are summed into their question (framing.forward_row_owners). Absent choices get 0."""
    from ..framing import forward_row_owners

    recorder = _Recorder(linears)
    with recorder.attached(), torch.enable_grad():
        scores = score_fn(questions)  # [B, C]
        first = next(iter(linears))
        owners = [o.to(scores.device) for o in
                  forward_row_owners(questions, [a.shape[0] for a in recorder.inputs[first]])]
        finite = scores.masked_fill(~torch.isfinite(scores), 0.0)
        jac = {n: torch.zeros(len(questions), scores.shape[1], m.out_features, m.in_features,
                              device=scores.device) for n, m in linears.items()}
        for c in range(scores.shape[1]):
            for n in linears:
                recorder.grads[n].clear()
            finite[:, c].sum().backward(retain_graph=c + 1 < scores.shape[1])
            for n in linears:
                for call, g in recorder.grads[n].items():
                    a = recorder.inputs[n][call]
                    per_row = torch.einsum("rto,rti->roi", g.reshape(g.shape[0], -1, g.shape[-1]).float(),
                                           a.reshape(a.shape[0], -1, a.shape[-1]).float())  # [rows, out, in]
                    jac[n][:, c].index_add_(0, owners[call], per_row)
    recorder.clear_inputs()
    for m in linears.values():
        m.weight.grad = None
    return scores.detach().float(), jac


def logit_covariance(blocks: list[KronBlock], jacobians: list[torch.Tensor], prior_precision) -> torch.Tensor:
    """GLM covariance of the logits [..., C, C]: Σ_blocks J (H + λI)^{-1} J^T for J [..., C, out, in],
    symmetrised."""
    cov = sum(block_quadratic(b, prior_precision, j) for b, j in zip(blocks, jacobians))
    return (cov + cov.transpose(-1, -2)) / 2
