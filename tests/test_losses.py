"""uqlora.losses.linear_cross_entropy against the naive oracle F.cross_entropy(F.linear(...)), on CPU.

The Triton kernel tests run the same checks through Triton's CPU interpreter (skipped when triton is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from uqlora.losses import default_chunk_size, linear_cross_entropy

REDUCTIONS = ("mean", "sum", "none")
TOL = dict(atol=1e-5, rtol=1e-5)


def naive(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
          softcap=None, **_):
    """The oracle: full [N, V] logits, optional softcap, torch's cross-entropy."""
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction).reshape(
        target.shape if reduction == "none" else ())


def make(n=37, d=16, v=507, bias=True, ignore="random", dtype=torch.float32, seed=0, lead=()):
    """hidden [*lead, n, d], weight [v, d], bias [v] | None, target [*lead, n] with some ignored tokens."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, n, d, generator=gen) / d**0.25
    weight = torch.randn(v, d, generator=gen) / d**0.25
    b = torch.randn(v, generator=gen) if bias else None
    target = torch.randint(0, v, (*lead, n), generator=gen)
    if ignore == "front":
        target[..., : n // 3] = -100
    elif ignore == "random":
        target[torch.rand(target.shape, generator=gen) < 0.3] = -100
    elif ignore == "all":
        target[:] = -100
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*tensors, target)


def loss_and_grads(fn, hidden, weight, bias, target, upstream, **kw):
    """fn's loss and its gradients w.r.t. hidden, weight (and bias) for the given upstream gradient."""
    loss = fn(hidden, weight, target, bias=bias, **kw)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    return loss.detach(), torch.autograd.grad(loss, inputs, upstream)


def check(fn, hidden, weight, bias, target, tol=TOL, **kw):
    """fn matches the naive oracle in loss and every gradient (random upstream gradient for 'none').

    The oracle runs in float64 on the same values: a 1e-5 tolerance needs a reference better than fp32 (at
    V=50257 the fp32 naive gradient is itself off by ~1e-4, ours by a few 1e-5)."""
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(target.shape if kw.get("reduction") == "none" else (), generator=gen)
    ours, ours_g = loss_and_grads(fn, hidden, weight, bias, target, upstream.to(hidden.dtype), **kw)
    exact = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref, ref_g = loss_and_grads(naive, *exact, target, upstream.double(), **kw)
    torch.testing.assert_close(ours, ref.to(ours.dtype), equal_nan=True, **tol)
    for g, r in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(g, r.to(g.dtype), **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", ["front", "random"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_matches_naive_fp32(eps, ignore, reduction):
    """Oracle F.cross_entropy(F.linear): loss, d/dhidden, d/dweight, d/dbias within 1e-5; N=37 is not a multiple
    of the chunk (8)."""
    check(linear_cross_entropy, *make(ignore=ignore), label_smoothing=eps, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_all_ignored(eps, reduction):
    """Oracle F.cross_entropy with every target ignored: mean is nan, sum 0, 'none' zeros, all gradients zero."""
    hidden, weight, bias, target = make(ignore="all")
    check(linear_cross_entropy, hidden, weight, bias, target, label_smoothing=eps, reduction=reduction,
          chunk_size=8)
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction)
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert (loss == 0).all()
    loss.sum().backward()
    assert all((t.grad == 0).all() for t in (hidden, weight, bias))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_bias_and_custom_ignore_index(reduction):
    """Oracle F.cross_entropy(F.linear) with bias=None and ignore_index=3 (token 3 ignored, -100 never used)."""
    hidden, weight, _, target = make(bias=False, ignore="none")
    target[::4] = 3
    check(linear_cross_entropy, hidden, weight, None, target, ignore_index=3, label_smoothing=0.1,
          reduction=reduction, chunk_size=10)


@pytest.mark.parametrize("chunk_size", [5, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_large_vocabulary(eps, reduction, chunk_size):
    """Oracle F.cross_entropy(F.linear) at V=50257 (GPT-2's vocabulary), small N and D; default and small chunk.
    Gradients within 5e-5: an fp32 matmul summing 50257 terms alone errs by a few 1e-5 (the fp32 naive loss errs
    by ~1e-4 here)."""
    check(linear_cross_entropy, *make(n=12, d=8, v=50257), tol=dict(atol=5e-5, rtol=1e-5), label_smoothing=eps,
          reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softcap(eps, reduction):
    """Oracle: naive logits capped by softcap * tanh(z / softcap), then F.cross_entropy."""
    hidden, weight, bias, target = make()
    with torch.no_grad():
        weight *= 4  # logits beyond the cap, so the tanh matters
    check(linear_cross_entropy, hidden, weight, bias, target, label_smoothing=eps, reduction=reduction,
          softcap=3.0, chunk_size=8)


def test_leading_dims():
    """Oracle F.cross_entropy(F.linear) on flattened tokens: hidden [2, 5, D], target [2, 5]; 'none' keeps
    target's shape."""
    hidden, weight, bias, target = make(n=5, lead=(2,))
    for reduction in REDUCTIONS:
        check(linear_cross_entropy, hidden, weight, bias, target, label_smoothing=0.1, reduction=reduction,
              chunk_size=3)
    assert linear_cross_entropy(hidden, weight, target, reduction="none").shape == (2, 5)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction, softcap):
    """Oracle: finite differences (torch.autograd.gradcheck) in float64, tiny shapes, some tokens ignored."""
    hidden, weight, bias, target = make(n=5, d=3, v=7, dtype=torch.float64)
    target[1] = -100

    def fn(h, w, b):
        return linear_cross_entropy(h, w, target, bias=b, label_smoothing=0.1, reduction=reduction,
                                    softcap=softcap, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_no_worse_than_naive(reduction):
    """Oracle: fp32 F.cross_entropy(F.linear) on the bf16 values upcast; ours in bf16 is within the naive bf16
    error + 1e-2 for the loss and every gradient, and returns torch's dtypes."""
    inputs = make(n=64, d=32, v=1000, dtype=torch.bfloat16)
    *tensors, target = inputs
    ref_inputs = [t.detach().float().requires_grad_() for t in tensors]
    upstream = torch.randn(target.shape if reduction == "none" else ())
    kw = dict(label_smoothing=0.1, reduction=reduction)
    ref, ref_g = loss_and_grads(naive, *ref_inputs, target, upstream, **kw)
    low, low_g = loss_and_grads(naive, *tensors, target, upstream.bfloat16(), **kw)
    ours, ours_g = loss_and_grads(linear_cross_entropy, *tensors, target, upstream.bfloat16(), chunk_size=24, **kw)
    for o, n, r in zip((ours, *ours_g), (low, *low_g), (ref, *ref_g), strict=True):
        assert o.dtype == n.dtype == torch.bfloat16
        assert (o.float() - r).abs().max() <= (n.float() - r).abs().max() + 1e-2


class _Record(TorchDispatchMode):
    """Records, over every aten op: the largest tensor created, the matmuls run, and the peak number of storages of
    at least `size` elements alive at once (a storage dies when the last tensor seen using it is freed)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.max_numel, self.matmuls, self.peak_live = size, 0, 0, 0
        self.live: dict[int, set[int]] = {}  # storage data_ptr -> ids of the live tensors on it

    def _freed(self, ptr: int, key: int) -> None:
        users = self.live.get(ptr)
        if users is not None:
            users.discard(key)
            if not users:
                del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.matmuls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            self.max_numel = max(self.max_numel, t.numel())
            storage = t.untyped_storage()
            if storage.nbytes() >= self.size * t.element_size():
                users = self.live.setdefault(storage.data_ptr(), set())
                if id(t) not in users:
                    users.add(id(t))
                    weakref.finalize(t, self._freed, storage.data_ptr(), id(t))
                self.peak_live = max(self.peak_live, len(self.live))
        return out


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_at_most_one_chunk_of_logits(reduction, softcap):
    """Oracle: a dispatch-mode record of every tensor created in forward + backward. No tensor exceeds one chunk
    of logits [chunk, V] (weight [V, D] and hidden [N, D] are smaller by construction), and only one chunk-sized
    buffer is alive at a time (two with softcap: the tanh is kept for its derivative), while the naive loss creates
    [N, V] logits and keeps several. Also counts matmuls: 3 per chunk for mean / sum, 1 + 3 (recomputed) for
    'none', one fewer per chunk when weight needs no gradient."""
    n, d, v, chunk = 64, 8, 300, 16
    hidden, weight, bias, target = make(n=n, d=d, v=v)
    kw = dict(label_smoothing=0.1, reduction=reduction, softcap=softcap)
    with _Record(chunk * v) as rec:
        naive(hidden, weight, target, bias=bias, **kw).sum().backward()
    assert rec.max_numel == n * v and rec.peak_live >= 3
    hidden.grad = weight.grad = bias.grad = None
    with _Record(chunk * v) as rec:
        linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=chunk, **kw).sum().backward()
    assert rec.max_numel == chunk * v
    assert rec.peak_live == (1 if softcap is None else 2)
    assert rec.matmuls == n // chunk * (3 if reduction != "none" else 4)
    weight.grad = None
    weight.requires_grad_(False)
    with _Record(chunk * v) as rec:
        linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=chunk, **kw).sum().backward()
    assert rec.matmuls == n // chunk * (2 if reduction != "none" else 3)
    assert weight.grad is None


def test_rejects_bad_arguments():
    """Oracle: the documented argument checks (reduction, label_smoothing range, softcap > 0, chunk_size >= 1,
    hidden and target token shapes)."""
    hidden, weight, _, target = make(n=4, d=3, v=5, bias=False)
    for bad in (dict(reduction="avg"), dict(label_smoothing=1.5), dict(softcap=0.0), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            linear_cross_entropy(hidden, weight, target, **bad)
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden, weight, target[:3])


def test_no_grad_and_default_chunk():
    """Oracle F.cross_entropy(F.linear) under torch.no_grad (loss only); the default chunk fits the budget."""
    hidden, weight, bias, target = make()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1),
                                   naive(hidden, weight, target, bias=bias, label_smoothing=0.1), **TOL)
    assert default_chunk_size(32000) == 524 and default_chunk_size(128256) == 130 and default_chunk_size(10**9) == 1


# --- Triton kernel, through Triton's CPU interpreter -----------------------------------------------------------
# TRITON_INTERPRET=1 must be set before triton is first imported in a process (triton.language's own helpers are
# jit functions decorated at import), and torch._dynamo imports triton as soon as anything touches it (a
# TorchDispatchMode does). So the Triton cases run in one subprocess with the variable set, and each test below
# reports one case.

NO_TRITON = "triton is not installed (pip install 'uqlora[triton]'): the Triton kernel tests need it"

# name: (make(...) arguments, extra ignored tokens, check(...) arguments); N=37, D=16, V=507, so blocks of 256 or
# 128 never divide V (the last block is masked).
TRITON_CASES = {
    **{f"eps{eps}-{reduction}": (dict(ignore="front"), True,
                                 dict(label_smoothing=eps, reduction=reduction, chunk_size=16, block=256))
       for eps in (0.0, 0.1) for reduction in REDUCTIONS},
    **{f"softcap-{reduction}": (dict(bias=False), False,
                                dict(label_smoothing=0.1, reduction=reduction, softcap=3.0, chunk_size=16, block=128))
       for reduction in ("mean", "none")},
    "all-ignored-mean": (dict(ignore="all"), False, dict(label_smoothing=0.1, reduction="mean", block=256)),
    "ignore-index-3-sum": (dict(ignore="none"), False, dict(ignore_index=3, reduction="sum", chunk_size=16, block=256)),
}


def run_triton_case(name: str) -> None:
    """One TRITON_CASES entry: triton_linear_cross_entropy against the oracle (in a TRITON_INTERPRET=1 process)."""
    from uqlora.kernels.linear_ce_triton import triton_linear_cross_entropy

    make_kw, more_ignored, kw = TRITON_CASES[name]
    hidden, weight, bias, target = make(**make_kw)
    if more_ignored:
        target[20::3] = -100
    if kw.get("ignore_index") == 3:
        target[::4] = 3
    if kw.get("softcap"):
        with torch.no_grad():
            weight *= 4  # logits beyond the cap
    check(triton_linear_cross_entropy, hidden, weight, bias, target, **kw)


_SUBPROCESS = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import test_losses
results = {}
for name in test_losses.TRITON_CASES:
    try:
        test_losses.run_triton_case(name)
        results[name] = "ok"
    except Exception:
        results[name] = traceback.format_exc()
open(sys.argv[2], "w").write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """Outcome of every TRITON_CASES entry, from one `TRITON_INTERPRET=1` subprocess."""
    pytest.importorskip("triton", reason=NO_TRITON)
    out = tmp_path_factory.mktemp("triton") / "results.json"
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(Path(__file__).parent), str(out)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_kernel(triton_results, case):
    """Oracle F.cross_entropy(F.linear) (float64), for the Triton kernel run by Triton's CPU interpreter: loss and
    gradients within 1e-5 for eps 0 / 0.1, every reduction, ignored tokens (front, scattered, all, ignore_index=3),
    softcap, with and without bias, V=507 in blocks of 256 or 128."""
    assert triton_results[case] == "ok", triton_results[case]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_kernel_compiles_for_gpu(tmp_path, monkeypatch):
    """Oracle: Triton's own compiler, which needs no GPU. The kernel (bf16 logits, softcap, gradient, BLOCK 4096)
    compiles ahead of time to a CUDA sm_90 binary: this checks what the interpreter does not (types, loop-carried
    values, constexpr branches)."""
    triton = pytest.importorskip("triton", reason=NO_TRITON)
    import triton.backends

    if os.environ.get("TRITON_INTERPRET") == "1" or "nvidia" not in triton.backends.backends:
        pytest.skip("needs Triton's NVIDIA backend outside interpreter mode")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from uqlora.kernels.linear_ce_triton import _ce_rows_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    signature = {"z_ptr": "*bf16", "z_stride": "i32", "target_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
                 "scale_stride": "i32", "V": "i32", "ignore_index": "i32", "eps": "fp32", "softcap": "fp32",
                 "HAS_SOFTCAP": "constexpr", "GRAD": "constexpr", "BLOCK": "constexpr"}
    source = ASTSource(_ce_rows_kernel, signature, constexprs={"HAS_SOFTCAP": True, "GRAD": True, "BLOCK": 4096})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"]
