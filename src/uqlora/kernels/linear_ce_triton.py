"""Triton row kernel for `uqlora.losses.linear_cross_entropy` (needs the optional `triton` package).

The chunk loop, autograd and matmuls are those of `uqlora.losses`: each chunk's logits z [c, V] come from a torch
matmul, then `_ce_rows_kernel` runs one program per row over the vocabulary in blocks of BLOCK columns:

  pass 1: online logsumexp, z[y] and sum_v z (after the optional softcap), giving the row loss
          (1 - eps) * (lse - z[y]) + eps * (lse - sum_v z / V), 0 for ignored rows;
  pass 2: (only when a gradient is wanted) overwrites z in place with
          scale * (softmax(z) - (1 - eps) onehot(y) - eps / V) * softcap'(z), 0 for ignored rows,

and torch matmuls turn that gradient into grad_hidden (chunk) and grad_weight (accumulated). On CPU tensors the
kernel runs under Triton's interpreter: set ``TRITON_INTERPRET=1`` before this module is imported.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from uqlora.losses import chunked_linear_cross_entropy

MAX_BLOCK = 4096  # columns per block on the GPU: one block per row for V <= 4096, else a loop


@triton.jit
def _tanh(x):
    # tanh from exp (libdevice.tanh is unavailable under the interpreter); e <= 1, so no overflow.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_rows_kernel(z_ptr, z_stride, target_ptr, loss_ptr, scale_ptr, scale_stride, V, ignore_index, eps,
                    softcap, HAS_SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride  # this row of the [c, V] logits
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    cols = tl.arange(0, BLOCK)

    # pass 1: running max m, sum of exp(z - m), sum of z
    m = -float("inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, -float("inf")), 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), 0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    loss = (1.0 - eps) * (lse - z_y) + eps * (lse - z_sum / V)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # pass 2: dloss/dz, written over the logits
    if GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row * scale_stride).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            z = tl.load(z_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            grad = tl.exp(z - lse) - eps / V - tl.where(start + cols == y, 1.0 - eps, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(z_row + start + cols, (scale * grad).to(z_ptr.dtype.element_ty), mask=mask)


def triton_rows(z: torch.Tensor, target: torch.Tensor, opts, grad_scale: torch.Tensor | None,
                block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row losses [c] (fp32) and, if grad_scale [c] is given, dloss/dz written over z [c, V] (same contract as
    `uqlora.losses.torch_rows`)."""
    c, vocab = z.shape
    z, target = z.contiguous(), target.contiguous()
    loss = torch.empty(c, dtype=torch.float32, device=z.device)
    scale = loss if grad_scale is None else grad_scale  # a dummy pointer when no gradient is wanted
    block = block or min(MAX_BLOCK, triton.next_power_of_2(vocab))
    if c:
        _ce_rows_kernel[(c,)](z, z.stride(0), target, loss, scale, scale.stride(0), vocab, opts.ignore_index,
                              opts.eps, opts.softcap or 1.0, HAS_SOFTCAP=opts.softcap is not None,
                              GRAD=grad_scale is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, None if grad_scale is None else z


def triton_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                                chunk_size: int | None = None, block: int | None = None) -> torch.Tensor:
    """`uqlora.losses.linear_cross_entropy` forced onto the Triton kernel, on any device (CPU tensors need
    ``TRITON_INTERPRET=1``). ``block`` overrides the columns per block (a power of two)."""
    return chunked_linear_cross_entropy(functools.partial(triton_rows, block=block), hidden, weight, target,
                                        bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                        reduction=reduction, softcap=softcap, chunk_size=chunk_size)
