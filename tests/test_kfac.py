"""K-FAC Laplace numerics (posthoc/kfac.py) against float64 brute force: dense torch.kron, torch.linalg.

Factors are stored in float32; the oracles take those stored float32 numbers to float64 and work densely, so the
block functions (float64 inside) are held to tight tolerances, and accumulation to float32 ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from uqlora.errors import UqloraError
from uqlora.posthoc.kfac import (PRIOR_PRECISION_MIN, Factor, FactorAccumulator, KronBlock, block_logdet,
                                 block_quadratic, block_solve, fit_prior_precision, kron_dense,
                                 log_marginal_likelihood)

F32_RTOL = 1e-5  # float32 accumulation vs float64 sums
F64_RTOL = 1e-9  # float64 block numerics vs float64 dense linear algebra


def rows(n: int, d: int, seed: int, subspace: int | None = None) -> torch.Tensor:
    """n random rows [n, d] in float64 with a decaying spectrum, or lying in a random `subspace`-dim subspace."""
    gen = torch.Generator().manual_seed(seed)
    if subspace is not None:
        return torch.randn(n, subspace, generator=gen, dtype=torch.float64) @ torch.randn(
            subspace, d, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)  # distinct eigenvalues, so truncation matters
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ torch.linalg.qr(
        torch.randn(d, d, generator=gen, dtype=torch.float64))[0]


def accumulate(x: torch.Tensor, *, max_full_dim: int, rank: int, batch: int | None = None) -> Factor:
    acc = FactorAccumulator(x.shape[1], max_full_dim=max_full_dim, rank=rank)
    for chunk in x.split(batch or max(len(x), 1)):
        acc.add(chunk)
    assert acc.rows_seen == len(x)
    return acc.factor()


def dense64(f: Factor) -> torch.Tensor:
    return Factor(f.eigvecs.double(), f.eigvals.double(), None if f.is_full else f.residual.double()).dense()


def exact64(f: Factor) -> Factor:
    """f in float64 with its float32-rounded eigvecs re-orthonormalised (QR, signs kept), so that the factor the
    block functions assume and the dense oracle agree to float64 precision."""
    Q, R = torch.linalg.qr(f.eigvecs.double())
    Q = Q * R.diagonal().sign()
    return Factor(Q, f.eigvals.double(), None if f.is_full else f.residual.double())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Three kinds of block, out 6 x in 9: the full G is rank deficient (4 rows) so zero curvature directions occur;
# a low-rank side keeps rank 3 of full-rank data, so its residual diagonal matters. float64: see exact64.
def make_block(kind: str, to64=exact64) -> KronBlock:
    full_g = to64(accumulate(rows(4, 6, seed=1), max_full_dim=30, rank=3))
    full_a = to64(accumulate(rows(20, 9, seed=2), max_full_dim=30, rank=3))
    if kind == "full":
        return KronBlock(A=full_a, G=full_g)
    if kind == "low_in":
        return KronBlock(A=to64(accumulate(rows(20, 9, seed=3), max_full_dim=5, rank=3)), G=full_g)
    return KronBlock(A=full_a, G=to64(accumulate(rows(20, 6, seed=4), max_full_dim=5, rank=3)))


def dense_precision(block: KronBlock, lam: float) -> torch.Tensor:
    H = torch.kron(dense64(block.G), dense64(block.A))
    return H + lam * torch.eye(len(H), dtype=torch.float64)


KINDS = ["full", "low_in", "low_out"]


def test_full_accumulation_is_the_gram_matrix():
    """Full side: Σ xᵀx over batches (one empty, one bf16) equals the float64 Gram matrix; dense() rebuilds it."""
    x = rows(25, 8, seed=0)
    acc = FactorAccumulator(8, max_full_dim=8, rank=2)
    acc.add(x[:10])
    acc.add(x[:0])
    acc.add(x[10:20].bfloat16())
    acc.add(x[20:].float())
    expected = x[:10].T @ x[:10] + x[10:20].bfloat16().double().T @ x[10:20].bfloat16().double() + x[20:].T @ x[20:]
    f = acc.factor()
    assert f.is_full and f.dim == 8 and acc.rows_seen == 25
    assert f.eigvecs.dtype == torch.float32 and bool((f.eigvals >= 0).all())
    assert rel_err(dense64(f), expected) < F32_RTOL
    assert rel_err(f.eigvecs.T.double() @ f.eigvecs.double(), torch.eye(8, dtype=torch.float64)) < F32_RTOL


def test_low_rank_diagonal_is_exact():
    """Low rank plus diagonal: diag(dense()) equals the exact diag(Σ xᵀx) although rank 2 < d = 20."""
    x = rows(40, 20, seed=5)
    f = accumulate(x, max_full_dim=10, rank=2, batch=7)
    assert not f.is_full and f.eigvecs.shape == (20, 2) and f.residual.shape == (20,)
    assert rel_err(dense64(f).diagonal(), (x * x).sum(0)) < F32_RTOL


@pytest.mark.parametrize("rank", [3, 5])
def test_low_rank_is_exact_when_rank_covers_the_data(rank):
    """Rows in a 3-dim subspace of 20 dims: rank >= 3 low-rank factor equals Σ xᵀx (float64 oracle)."""
    x = rows(30, 20, seed=6, subspace=3)
    f = accumulate(x, max_full_dim=10, rank=rank, batch=4)
    assert rel_err(dense64(f), x.T @ x) < 10 * F32_RTOL


def test_low_rank_error_shrinks_with_rank():
    """Frobenius error ‖F − F_k‖ of the streamed low-rank+diag factor decreases with k and is ~0 at k = d."""
    x = rows(60, 12, seed=7)
    exact = x.T @ x
    errors = [rel_err(dense64(accumulate(x, max_full_dim=4, rank=k, batch=9)), exact) for k in range(1, 13)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 10 * F32_RTOL


@pytest.mark.parametrize("max_full_dim", [4, 30])
def test_incremental_adds_equal_one_add(max_full_dim):
    """Batches of 1 and 3 rows give the same factor as one add (low-rank data of rank 3 <= k, and full sides)."""
    x = rows(24, 16, seed=8, subspace=3)
    one = dense64(accumulate(x, max_full_dim=max_full_dim, rank=4))
    for batch in (1, 3):
        assert rel_err(dense64(accumulate(x, max_full_dim=max_full_dim, rank=4, batch=batch)), one) < 10 * F32_RTOL


def merged(parts: list[torch.Tensor], *, max_full_dim: int, rank: int) -> FactorAccumulator:
    """One accumulator per part (a process's share of the rows), merged as fit_kfac merges processes."""
    accs = [FactorAccumulator(parts[0].shape[1], max_full_dim=max_full_dim, rank=rank) for _ in parts]
    for acc, x in zip(accs, parts):
        acc.add(x)
    accs[0].merge([acc.summary() for acc in accs])
    return accs[0]


@pytest.mark.parametrize("max_full_dim", [4, 30])
def test_merge_of_shares_equals_one_stream_when_exact(max_full_dim):
    """Rows of rank 3 <= k split 3 ways (one share empty): the merged factor equals one accumulator over all rows,
    full side or low rank, and counts every row."""
    x = rows(24, 16, seed=9, subspace=3)
    acc = merged([x[0::2], x[1::2], x[:0]], max_full_dim=max_full_dim, rank=4)
    assert acc.rows_seen == 24
    assert rel_err(dense64(acc.factor()), dense64(accumulate(x, max_full_dim=max_full_dim, rank=4))) < 10 * F32_RTOL


def test_merge_of_truncated_shares_is_within_the_dropped_energy():
    """Full-rank rows, rank 3 of 12: one stream and two merged streams differ, but both keep the exact diagonal
    and a low-rank part L ⪯ F whose dropped energy trace(F − L) is Σ residual, so their low-rank parts differ by
    at most the sum of what each dropped (nuclear norm)."""
    x = rows(60, 12, seed=10)
    exact = x.T @ x
    one = accumulate(x, max_full_dim=4, rank=3, batch=9)
    two = merged([x[0::2], x[1::2]], max_full_dim=4, rank=3).factor()
    low = []
    for f in (one, two):
        L = dense64(Factor(f.eigvecs, f.eigvals, None if f.is_full else torch.zeros_like(f.residual)))
        assert rel_err(dense64(f).diagonal(), exact.diagonal()) < F32_RTOL
        assert torch.linalg.eigvalsh(exact - L).min() > -F32_RTOL * exact.trace()  # L ⪯ F
        assert float(exact.trace() - L.trace()) == pytest.approx(float(f.residual.double().sum()), rel=1e-4)
        low.append(L)
    gap = torch.linalg.matrix_norm(low[0] - low[1], ord="nuc")
    assert 0 < gap <= (one.residual.double().sum() + two.residual.double().sum()) * (1 + 1e-4)


def test_merge_refuses_another_side():
    acc = FactorAccumulator(8, max_full_dim=4, rank=2)
    with pytest.raises(UqloraError, match="side 8"):
        acc.merge([FactorAccumulator(6, max_full_dim=4, rank=2).summary()])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [1e-3, 0.7])
def test_block_logdet(kind, lam):
    """block_logdet equals torch.logdet(kron(G, A) + λI) of the dense float64 matrix."""
    block = make_block(kind)
    got = block_logdet(block, torch.tensor(lam, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert math.isclose(float(got), float(torch.logdet(dense_precision(block, lam))), rel_tol=F64_RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_block_solve(kind):
    """block_solve on X [2, 3, out, in] equals torch.linalg.solve of the dense precision, per batch entry."""
    block, lam = make_block(kind), 0.05
    X = torch.randn(2, 3, 6, 9, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = block_solve(block, lam, X)
    expected = torch.linalg.solve(dense_precision(block, lam), X.reshape(6, 54).T).T.reshape(2, 3, 6, 9)
    assert got.shape == X.shape and got.dtype == X.dtype
    assert rel_err(got, expected) < F64_RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_block_quadratic(kind):
    """block_quadratic(J) equals J (H + λI)⁻¹ Jᵀ [C, C] by dense solve (C = 4), and is symmetric."""
    block, lam = make_block(kind), 0.3
    J = torch.randn(4, 6, 9, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    Jf = J.reshape(4, 54)
    expected = Jf @ torch.linalg.solve(dense_precision(block, lam), Jf.T)
    got = block_quadratic(block, torch.tensor(lam, dtype=torch.float64), J)
    assert rel_err(got, expected) < F64_RTOL and torch.equal(got, got.T)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_factors(kind):
    """The factors as accumulated (float32, eigvecs orthonormal to float32 round-off) agree with the dense
    float64 oracle to float32 precision: logdet (rel. 1e-6) and solve (rel. 1e-5)."""
    block, lam = make_block(kind, to64=lambda f: f), 0.05
    assert block.A.eigvecs.dtype == torch.float32
    dense = dense_precision(block, lam)
    logdet = block_logdet(block, torch.tensor(lam, dtype=torch.float64))
    assert math.isclose(float(logdet), float(torch.logdet(dense)), rel_tol=1e-6)
    X = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(15))
    got = block_solve(block, lam, X)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), torch.linalg.solve(dense, X.double().reshape(3, 54).T).T.reshape(3, 6, 9)) < 1e-5


def evidence(blocks, lam: float, theta_sq: float, ll: float) -> float:
    return float(log_marginal_likelihood(blocks, torch.tensor(lam, dtype=torch.float64), theta_sq, ll))


def test_log_marginal_likelihood_value_and_gradient():
    """Evidence equals the dense formula ll − λ/2‖θ‖² + P/2 log λ − 1/2 Σ logdet(H_b + λI); autograd d/d log λ
    equals a central finite difference (step 1e-5, rel. tol 1e-6)."""
    blocks, theta_sq, ll = [make_block(k) for k in KINDS], 3.5, -12.0
    lam, P = 0.2, 3 * 54
    dense = ll - lam / 2 * theta_sq + P / 2 * math.log(lam) - sum(
        float(torch.logdet(dense_precision(b, lam))) for b in blocks) / 2
    assert math.isclose(evidence(blocks, lam, theta_sq, ll), dense, rel_tol=F64_RTOL)

    t = torch.tensor(math.log(lam), dtype=torch.float64, requires_grad=True)
    log_marginal_likelihood(blocks, t.exp(), theta_sq, ll).backward()
    step = 1e-5
    fd = (evidence(blocks, lam * math.exp(step), theta_sq, ll)
          - evidence(blocks, lam * math.exp(-step), theta_sq, ll)) / (2 * step)
    assert math.isclose(float(t.grad), fd, rel_tol=1e-6)


def test_fit_prior_precision_is_a_maximum():
    """The fitted λ has d evidence / d log λ ≈ 0 (autograd) and beats λ/2 and 2λ."""
    blocks, theta_sq = [make_block(k) for k in KINDS], 3.5
    lam = fit_prior_precision(blocks, theta_sq, init=100.0)
    t = torch.tensor(math.log(lam), dtype=torch.float64, requires_grad=True)
    log_marginal_likelihood(blocks, t.exp(), theta_sq, 0.0).backward()
    assert abs(float(t.grad)) < 1e-8
    best = evidence(blocks, lam, theta_sq, 0.0)
    assert best >= evidence(blocks, lam / 2, theta_sq, 0.0) and best >= evidence(blocks, lam * 2, theta_sq, 0.0)


def isotropic_block(out: int, inp: int, g: float, a: float) -> KronBlock:
    eye = torch.eye  # every curvature eigenvalue of the block is h = g·a
    return KronBlock(A=Factor(eye(inp), torch.full((inp,), a), None), G=Factor(eye(out), torch.full((out,), g), None))


@pytest.mark.parametrize("h", [0.5, 40.0])
def test_fit_prior_precision_known_answer(h):
    """All P curvature eigenvalues equal h: d evidence/dλ = 0 is P/λ − P/(h + λ) = ‖θ‖², whose positive root is
    λ = (−h + √(h² + 4Ph/‖θ‖²))/2 (rel. tol 1e-8). A low-rank output side with the same H gives the same λ."""
    theta_sq, P = 2.0, 5 * 7
    expected = (-h + math.sqrt(h * h + 4 * P * h / theta_sq)) / 2
    assert math.isclose(fit_prior_precision([isotropic_block(5, 7, h / 2, 2.0)], theta_sq), expected, rel_tol=1e-8)
    # U diag(s) Uᵀ + diag(r) = (h/2)·I with one eigenvalue in s, a zero one, and the rest in the residual
    low_g = Factor(torch.eye(5, 2), torch.tensor([h / 2, 0.0]), torch.tensor([0.0] + [h / 2] * 4))
    block = KronBlock(A=Factor(torch.eye(7), torch.full((7,), 2.0), None), G=low_g)
    assert torch.allclose(dense64(block.G), h / 2 * torch.eye(5, dtype=torch.float64))
    assert math.isclose(fit_prior_precision([block], theta_sq), expected, rel_tol=1e-8)


def test_fit_prior_precision_limits():
    """Huge curvature (h ≫ λ): the Occam term vanishes and λ → P/‖θ‖², the MAP-of-the-prior answer (rel. 1e-3).
    No curvature (H = 0): the evidence is −λ/2‖θ‖² + const, decreasing, so the fit stops at PRIOR_PRECISION_MIN."""
    theta_sq, P = 2.0, 5 * 7
    assert math.isclose(fit_prior_precision([isotropic_block(5, 7, 1e4, 1e4)], theta_sq), P / theta_sq,
                        rel_tol=1e-3)
    lam = fit_prior_precision([isotropic_block(5, 7, 0.0, 0.0)], theta_sq)
    assert math.isclose(lam, PRIOR_PRECISION_MIN, rel_tol=1e-6)


@pytest.mark.parametrize("max_full_dim", [4, 30])
def test_factor_state_dict_round_trip(max_full_dim):
    """state_dict -> from_state_dict gives identical tensors (full and low rank); a missing key or a wrong shape
    raises UqloraError naming the prefix."""
    f = accumulate(rows(10, 6, seed=11), max_full_dim=max_full_dim, rank=2)
    state = f.state_dict("layer.0.A")
    assert set(state) == {"layer.0.A.eigvecs", "layer.0.A.eigvals"} | (set() if f.is_full else {"layer.0.A.residual"})
    back = Factor.from_state_dict(state, "layer.0.A")
    assert back.is_full == f.is_full and torch.equal(back.eigvecs, f.eigvecs) and torch.equal(back.eigvals, f.eigvals)
    assert f.is_full or torch.equal(back.residual, f.residual)
    assert f.nbytes == sum(t.numel() * 4 for t in state.values())
    with pytest.raises(UqloraError, match="layer.0.A"):
        Factor.from_state_dict({k: v for k, v in state.items() if not k.endswith("eigvals")}, "layer.0.A")
    with pytest.raises(UqloraError, match="layer.0.A"):
        Factor.from_state_dict({**state, "layer.0.A.eigvals": torch.zeros(7)}, "layer.0.A")


def test_scaled_factor():
    """scaled(c) is c·F densely, for both kinds of factor."""
    for max_full_dim in (4, 30):
        f = accumulate(rows(10, 6, seed=12), max_full_dim=max_full_dim, rank=2)
        assert rel_err(dense64(f.scaled(0.25)), 0.25 * dense64(f)) < F32_RTOL


def test_block_needs_a_full_side():
    """KronBlock with two low-rank sides raises UqloraError naming both dims; kron_dense has side out·in."""
    low_a = accumulate(rows(5, 9, seed=13), max_full_dim=4, rank=2)
    low_g = accumulate(rows(5, 6, seed=14), max_full_dim=4, rank=2)
    with pytest.raises(UqloraError, match="out 6, in 9"):
        KronBlock(A=low_a, G=low_g)
    block = make_block("low_in")
    assert block.n_params == 54 and kron_dense(block).shape == (54, 54)
