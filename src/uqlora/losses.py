"""Memory-efficient linear + (label-smoothed) cross-entropy for LM heads.

Label smoothing is the calibration lever studied by Huang, Lu & Zeng, "Calibrated Language Models and How to Find
Them with Label Smoothing" (ICML 2025). With a large vocabulary the logits ``hidden @ weight.T`` ([N, V]) dominate
training memory, so `linear_cross_entropy` computes

    loss_i = (1 - eps) * (lse(z_i) - z_i[y_i]) + eps * (lse(z_i) - mean_v z_i[v]),   z_i = softcap(W h_i + b)

(PyTorch's convention: the target also receives eps / V) without ever holding more than one chunk of logits
[chunk, V]. It matches ``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` exactly, including
``ignore_index`` and the ``mean`` / ``sum`` / ``none`` reductions.

Gradient strategy. For ``mean`` and ``sum`` the upstream gradient is a scalar, so the gradients w.r.t. hidden,
weight and bias are computed chunk by chunk during the forward (dloss/dz = softmax - (1 - eps) onehot - eps / V,
times the softcap derivative and the reduction scale) and the backward only multiplies them by that scalar: three
matmuls per chunk in total, as in the naive loss, and no second pass over the vocabulary. For ``none`` the upstream
gradient is a vector known only in the backward, so the backward recomputes each chunk's logits (four matmuls per
chunk). Only the gradients of inputs that require them are computed; under ``torch.no_grad()`` only the loss is.
The backward returns scaled copies of the precomputed gradients, so ``retain_graph=True`` (and gradcheck) work.

Precision. bf16 / fp16 logits are upcast per chunk: softmax statistics and the weight / bias gradient accumulators
are fp32; the matmuls run in the input dtype and the returned loss and gradients have the input dtypes, as in torch.

On CUDA, when `triton` is importable, the per-row softmax work runs in a Triton kernel
(`uqlora.kernels.linear_ce_triton`); elsewhere the chunked torch code below is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

# Memory budget for one chunk of fp32 logits [chunk, V]. The chunk's working set is about two such buffers (the
# logits, turned in place into dloss/dz, plus the low-precision copy or the softcap's tanh), so 64 MiB keeps the
# loss's transient memory near 128 MiB -- well under a tenth of the naive [N, V] logits for a few thousand tokens
# -- while chunks stay large enough for efficient matmuls (524 rows at V=32000, 130 rows at V=128256).
LOGITS_CHUNK_BYTES = 64 * 2**20

REDUCTIONS = ("mean", "sum", "none")

# rows(z [c, V], target [c], opts, grad_scale [c] | None) -> (loss [c], dloss/dz [c, V] | None); it may reuse z.
RowsFn = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class _Opts:
    ignore_index: int
    eps: float
    softcap: float | None
    reduction: str
    chunk: int
    rows: RowsFn


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk such that chunk * V fp32 logits fit in `LOGITS_CHUNK_BYTES`."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for bf16 / fp16 (and fp32), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def torch_rows(z: torch.Tensor, target: torch.Tensor, opts: _Opts,
               grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss of each row of one chunk of logits and, if grad_scale is given, grad_scale * dloss/dz.

    z [c, V] raw logits (consumed: reused in place), target [c]; grad_scale [c] or None.
    Returns loss [c] and dz [c, V] in the accumulation dtype; ignored rows get loss 0 and gradient 0.
    """
    eps, cap = opts.eps, opts.softcap
    z = z.to(acc_dtype(z.dtype))  # [c, V]; a copy only for bf16 / fp16
    vocab = z.shape[1]
    valid = target != opts.ignore_index  # [c]
    y = torch.where(valid, target, 0)[:, None]  # [c, 1]
    if cap is not None:
        t = z.div_(cap).tanh_()  # [c, V] tanh(z / cap), kept for the derivative
        z = t * cap
    z = z.sub_(z.amax(1, keepdim=True))  # shifted logits: lse and the loss are shift invariant
    z_y = z.gather(1, y)[:, 0]  # [c]
    mean_z = z.mean(1) if eps else 0.0  # [c]
    p = z.exp_()  # [c, V] unnormalised softmax (z is gone)
    total = p.sum(1, keepdim=True)  # [c, 1]
    lse = total.log()[:, 0]  # [c]
    loss = torch.where(valid, (1 - eps) * (lse - z_y) + eps * (lse - mean_z), 0.0)
    if grad_scale is None:
        return loss, None
    scale = torch.where(valid, grad_scale, 0.0)[:, None]  # [c, 1]
    grad = p.mul_(scale / total)  # scale * softmax
    if eps:
        grad.sub_(scale * (eps / vocab))  # - scale * eps / V
    grad.scatter_add_(1, y, scale * (eps - 1))  # - scale * (1 - eps) onehot
    if cap is not None:
        grad.mul_(t.square_().neg_().add_(1))  # d softcap(z) / dz = 1 - tanh^2
    return loss, grad


def _chunk_pass(hidden, weight, bias, target, opts: _Opts, grad_scale, needs):
    """One pass over the chunks of rows: per-row losses and, if grad_scale [N] is given, the gradients.

    hidden [N, D], weight [V, D], bias [V] | None, target [N]; needs = (hidden, weight, bias) grads wanted.
    Returns loss [N] (acc dtype), grad_hidden [N, D] (hidden dtype), grad_weight [V, D], grad_bias [V] (acc dtype);
    gradients are None where not wanted.
    """
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    want = grad_scale is not None
    losses = hidden.new_empty(n, dtype=acc)
    g_h = hidden.new_empty(hidden.shape) if want and needs[0] else None
    g_w = weight.new_zeros(weight.shape, dtype=acc) if want and needs[1] else None
    g_b = weight.new_zeros(weight.shape[0], dtype=acc) if want and needs[2] else None
    for s in range(0, n, opts.chunk):
        e = min(s + opts.chunk, n)
        h = hidden[s:e]  # [c, D]
        z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # [c, V]
        loss, dz = opts.rows(z, target[s:e], opts, None if not want else grad_scale[s:e])
        losses[s:e] = loss
        del z
        if dz is None:
            continue
        if g_b is not None:
            g_b += dz.sum(0, dtype=acc)
        dz = dz.to(hidden.dtype)  # [c, V] matmul operand
        if g_h is not None:
            torch.mm(dz, weight, out=g_h[s:e])
        if g_w is not None:
            if g_w.dtype == dz.dtype:
                g_w.addmm_(dz.t(), h)
            else:
                g_w += dz.t() @ h  # low-precision matmul (fp32 accumulate inside), fp32 sum over chunks
        del dz  # before the next chunk's logits exist
    return losses, g_h, g_w, g_b


def _forward(hidden, weight, bias, target, opts: _Opts, needs):
    """The reduced loss and, for mean / sum, the gradients (for an upstream gradient of 1) of the inputs in needs."""
    count = (target != opts.ignore_index).sum()  # non-ignored tokens
    scale = None  # [N] dloss/dloss_i
    if opts.reduction != "none" and any(needs):
        # 1 / max(count, 1): when every token is ignored the gradients stay 0 (not nan), as in torch.
        scale = 1.0 / count.clamp(min=1) if opts.reduction == "mean" else torch.ones((), device=hidden.device)
        scale = scale.to(acc_dtype(hidden.dtype)).expand(hidden.shape[0])
    losses, *grads = _chunk_pass(hidden, weight, bias, target, opts, scale, needs)
    if opts.reduction == "none":
        return losses.to(hidden.dtype), grads
    total = losses.sum()
    return (total / count if opts.reduction == "mean" else total).to(hidden.dtype), grads  # 0 / 0 = nan, as torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts: _Opts):
        loss, ctx.grads = _forward(hidden, weight, bias, target, opts, ctx.needs_input_grad[:3])
        ctx.opts = opts
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if opts.reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.opts.reduction == "none":  # recompute the logits chunk by chunk, with the per-row upstream gradient
            hidden, weight, bias, target = ctx.saved_tensors
            scale = grad_out.to(acc_dtype(hidden.dtype))
            _, *grads = _chunk_pass(hidden, weight, bias, target, ctx.opts, scale, ctx.needs_input_grad[:3])
        else:  # precomputed in the forward; the upstream gradient is a scalar (kept intact for retain_graph)
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]
        g_h, g_w, g_b = (None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
        return g_h, g_w, g_b, None, None


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _default_rows(hidden: torch.Tensor) -> RowsFn:
    """The Triton row kernel for CUDA tensors when triton is importable, else the torch code."""
    if hidden.is_cuda and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_available():
        from uqlora.kernels.linear_ce_triton import triton_rows

        return triton_rows
    return torch_rows


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", softcap: float | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without materialising the [N, V] logits.

    hidden [..., D], weight [V, D], bias [V] or None, target [...] (int64); returns a scalar, or a loss of
    target's shape for ``reduction="none"``. ``softcap`` replaces the logits z by ``softcap * tanh(z / softcap)``
    before the loss. ``chunk_size`` rows of logits are computed at a time (default: `default_chunk_size`).

    ``mean`` divides by the number of non-ignored tokens. When every token is ignored this matches PyTorch:
    ``mean`` returns nan (0 / 0) and ``sum`` returns 0, per-token losses are 0, and all gradients are zero.
    """
    return chunked_linear_cross_entropy(_default_rows(hidden), hidden, weight, target, bias=bias,
                                        ignore_index=ignore_index, label_smoothing=label_smoothing,
                                        reduction=reduction, softcap=softcap, chunk_size=chunk_size)


def chunked_linear_cross_entropy(rows: RowsFn, hidden, weight, target, *, bias, ignore_index, label_smoothing,
                                 reduction, softcap, chunk_size) -> torch.Tensor:
    """`linear_cross_entropy` with an explicit per-chunk row function (`torch_rows` or the Triton one)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree on tokens")
    out_shape = target.shape
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)  # [N, D], [N]
    opts = _Opts(ignore_index, float(label_smoothing), None if softcap is None else float(softcap), reduction,
                 chunk_size or default_chunk_size(weight.shape[0]), rows)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        loss = _LinearCrossEntropy.apply(hidden, weight, bias, target, opts)
    else:  # no autograd: losses only
        loss = _forward(hidden, weight, bias, target, opts, (False, False, False))[0]
    return loss.reshape(out_shape) if reduction == "none" else loss
