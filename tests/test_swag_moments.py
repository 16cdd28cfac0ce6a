"""SWAG moments (Maddox et al. 2019, Algorithm 1 and the sampling equation) against independent oracles:
float64 numpy loops written straight from the paper, dense P x P covariances built only here (small P), and
Monte Carlo moments of many draws checked within stated standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from uqlora.methods.swag_moments import SwagMoments


def snapshots(n: int, p: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=gen) + 0.3 * i for i in range(n)]


def oracle(thetas: list[torch.Tensor], k: int):
    """Algorithm 1 in float64 numpy: running moments; deviation_i = theta_i - running mean after step i;
    the last K deviations, oldest first."""
    mean = np.zeros(thetas[0].numel())
    sq = np.zeros_like(mean)
    devs = []
    for i, t in enumerate(thetas):
        x = t.double().numpy()
        mean = (i * mean + x) / (i + 1)
        sq = (i * sq + x ** 2) / (i + 1)
        devs.append(x - mean)
    return mean, sq, np.stack(devs[-k:])


def dense_cov(thetas: list[torch.Tensor], k: int, scale: float) -> np.ndarray:
    """scale * (diag(var)/2 + D^T D / (2 (K'-1))) as a P x P float64 matrix (low-rank term only for K' >= 2)."""
    mean, sq, dev = oracle(thetas, k)
    cov = 0.5 * np.diag(np.maximum(sq - mean ** 2, 0.0))
    if dev.shape[0] >= 2:
        cov = cov + dev.T @ dev / (2 * (dev.shape[0] - 1))
    return scale * cov


def collected(thetas, k, **kw) -> SwagMoments:
    s = SwagMoments(thetas[0].numel(), k, **kw)
    for t in thetas:
        s.collect(t)
    return s


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_moments_and_ring_buffer_match_loop(n):
    """mean, sq_mean, variance and the kept deviation rows (K=3, up to 7 snapshots so the ring wraps twice)
    equal the float64 loop oracle."""
    thetas = snapshots(n, 5)
    s = collected(thetas, 3)
    mean, sq, dev = oracle(thetas, 3)
    assert s.n_collected == n
    np.testing.assert_allclose(s.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.sq_mean.numpy(), sq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.variance().numpy(), np.maximum(sq - mean ** 2, 0), atol=1e-5)
    d = s.deviation_matrix()
    assert d.shape == (min(n, 3), 5) and d.dtype == torch.float32
    np.testing.assert_allclose(d.numpy(), dev, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,scale", [(7, 3, 1.0), (5, 4, 0.7), (3, 10, 2.0), (2, 2, 1.0)])
def test_covariance_factors_match_dense(n, k, scale):
    """diag(diag) + L^T L equals the dense scale*(diag(var)/2 + D D^T/(2(K'-1))), incl. K'=min(n,K) < K."""
    thetas = snapshots(n, 6, seed=1)
    diag, low = collected(thetas, k).covariance_factors(scale)
    assert diag.shape == (6,) and low.shape == (min(n, k), 6)
    got = np.diag(diag.double().numpy()) + low.double().numpy().T @ low.double().numpy()
    np.testing.assert_allclose(got, dense_cov(thetas, k, scale), rtol=1e-5, atol=1e-6)


def test_sample_equals_formula_for_replayed_noise():
    """sample() = mean + sqrt(scale)(sqrt(var) z1/sqrt2 + D^T z2/sqrt(2(K'-1))) with z1 [P] then z2 [K'] drawn
    from the same CPU generator seed, D from the loop oracle (with wrap: K=4, 6 snapshots)."""
    thetas = snapshots(6, 6, seed=2)
    s = collected(thetas, 4)
    mean, sq, dev = oracle(thetas, 4)
    gen = torch.Generator().manual_seed(123)
    z1 = torch.randn(6, generator=gen).double().numpy()
    z2 = torch.randn(4, generator=gen).double().numpy()
    expect = mean + math.sqrt(0.7) * (np.sqrt(np.maximum(sq - mean ** 2, 0)) * z1 / math.sqrt(2)
                                      + dev.T @ z2 / math.sqrt(2 * 3))
    got = s.sample(0.7, generator=torch.Generator().manual_seed(123))
    assert got.shape == (6,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_sample_moments_statistical():
    """N = 20,000 calls of sample(scale=0.7) (P=6, K=4, 6 snapshots). Oracle: the dense covariance
    S = 0.7 (diag(var)/2 + D D^T/(2(K'-1))). Tolerance: 5 standard errors, with se(mean_i) = sqrt(S_ii/N) and,
    for a Gaussian sample covariance, se(S_ij) = sqrt((S_ii S_jj + S_ij^2)/N); 27 checked entries at 5 se
    fail by chance with probability < 1e-4, and the seed is fixed so the test is deterministic."""
    thetas = snapshots(6, 6, seed=3)
    s = collected(thetas, 4)
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([s.sample(0.7, generator=gen) for _ in range(n)]).double().numpy()  # [N, P]
    mean, _, _ = oracle(thetas, 4)
    cov = dense_cov(thetas, 4, 0.7)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * se_mean)
    emp = np.cov(draws, rowvar=False)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    assert np.all(np.abs(emp - cov) < 5 * se_cov), np.abs(emp - cov) / se_cov


def test_scale_zero_and_swa_only():
    """scale=0 returns exactly the mean (a copy); low_rank=False keeps only the mean (SWA), samples equal it,
    refuses variance; nbytes = (K+2)*P*4 and P*4."""
    thetas = snapshots(5, 7)
    s = collected(thetas, 3)
    out = s.sample(0.0)
    assert torch.equal(out, s.mean) and out.data_ptr() != s.mean.data_ptr()
    assert s.nbytes() == (3 + 2) * 7 * 4

    swa = collected(thetas, 3, low_rank=False)
    assert swa.sq_mean is None and swa.deviations is None
    assert torch.equal(swa.mean, s.mean)
    assert torch.equal(swa.sample(1.0, generator=torch.Generator().manual_seed(0)), swa.mean)
    assert swa.nbytes() == 7 * 4
    with pytest.raises(ValueError):
        swa.variance()
    with pytest.raises(ValueError):
        s.sample(-1.0)


def test_few_snapshots():
    """K=10 with 3 snapshots uses K'=3 (covariance vs dense oracle); one snapshot samples the mean exactly
    (variance 0, no low-rank term); zero snapshots raise ValueError; bad constructor args raise."""
    thetas = snapshots(3, 4, seed=4)
    s = collected(thetas, 10)
    diag, low = s.covariance_factors()
    assert low.shape == (3, 4)
    got = np.diag(diag.double().numpy()) + low.double().numpy().T @ low.double().numpy()
    np.testing.assert_allclose(got, dense_cov(thetas, 10, 1.0), rtol=1e-5, atol=1e-6)

    one = collected(thetas[:1], 10)
    assert one.covariance_factors()[1].shape == (0, 4)
    assert torch.equal(one.sample(generator=torch.Generator().manual_seed(0)), one.mean)

    with pytest.raises(ValueError, match="no snapshots"):
        SwagMoments(4, 10).sample()
    with pytest.raises(ValueError, match="no snapshots"):
        SwagMoments(4, 10, low_rank=False).sample()
    for args in [(0, 2), (4, 0)]:
        with pytest.raises(ValueError):
            SwagMoments(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_input_dtypes_stored_float32(dtype):
    """float64 / bfloat16 snapshots are stored as float32 and equal the oracle on the float32 cast of the
    input; sample() returns float32."""
    thetas = [t.to(dtype) for t in snapshots(4, 5, seed=5)]
    s = collected(thetas, 3)
    assert s.mean.dtype == s.sq_mean.dtype == s.deviations.dtype == torch.float32
    mean, sq, dev = oracle([t.float() for t in thetas], 3)
    np.testing.assert_allclose(s.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.deviation_matrix().numpy(), dev, rtol=1e-5, atol=1e-5)
    assert s.sample(generator=torch.Generator().manual_seed(0)).dtype == torch.float32
    with pytest.raises(ValueError):
        s.collect(torch.ones(6))
    with pytest.raises(ValueError):
        s.collect(torch.full((5,), float("nan")))


@pytest.mark.parametrize("n_before", [2, 3, 5])
@pytest.mark.parametrize("low_rank", [True, False])
def test_state_dict_roundtrip_through_safetensors(tmp_path, n_before, low_rank):
    """state_dict -> safetensors file -> from_state_dict: same-seed samples are torch.equal, and collecting 4
    more snapshots (ring wraps, K=3) gives tensors torch.equal to never having saved."""
    thetas = snapshots(n_before + 4, 6, seed=6)
    ref = collected(thetas[:n_before], 3, low_rank=low_rank)
    state = ref.state_dict()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    save_file(state, tmp_path / "swag.safetensors")
    loaded = SwagMoments.from_state_dict(load_file(tmp_path / "swag.safetensors"))
    assert loaded.low_rank == low_rank and loaded.n_collected == n_before
    assert torch.equal(loaded.sample(0.5, torch.Generator().manual_seed(9)),
                       ref.sample(0.5, torch.Generator().manual_seed(9)))
    for t in thetas[n_before:]:
        ref.collect(t)
        loaded.collect(t)
    assert torch.equal(loaded.mean, ref.mean) and loaded.nbytes() == ref.nbytes()
    if low_rank:
        assert torch.equal(loaded.sq_mean, ref.sq_mean)
        assert torch.equal(loaded.deviation_matrix(), ref.deviation_matrix())
        assert torch.equal(loaded.deviations, ref.deviations)  # same ring slots, not just same order
    assert torch.equal(loaded.sample(1.0, torch.Generator().manual_seed(3)),
                       ref.sample(1.0, torch.Generator().manual_seed(3)))


def test_from_state_dict_rejects_malformed():
    """Missing keys, partial low-rank keys, unknown keys and inconsistent shapes / values raise ValueError."""
    good = collected(snapshots(5, 4), 3).state_dict()

    def bad(**changes):
        state = {**good, **changes}
        for key, value in changes.items():
            if value is None:
                del state[key]
        with pytest.raises(ValueError):
            SwagMoments.from_state_dict(state)

    SwagMoments.from_state_dict(good)  # sanity: the unmodified state loads
    bad(mean=None)
    bad(n_collected=None)
    bad(deviations=None)  # partial low-rank state
    bad(extra=torch.zeros(1))
    bad(sq_mean=torch.zeros(5))
    bad(deviations=torch.zeros(2, 4))  # rows != min(n_collected, rank)
    bad(deviations=torch.zeros(3, 5))
    bad(n_collected=torch.tensor(2))  # then rows should be 2
    bad(mean=torch.zeros(2, 2))
    bad(mean=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    bad(deviations=torch.full((3, 4), float("inf")))
    bad(rank=torch.tensor(0))
    bad(n_collected=torch.tensor(-1))
    bad(n_collected=torch.tensor(5.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_draw_on_cuda():
    """A generator seed gives the same draw on CUDA as on CPU (noise is drawn on the CPU)."""
    thetas = snapshots(6, 8, seed=7)
    cpu = collected(thetas, 4)
    gpu = collected(thetas, 4, device="cuda")
    a = cpu.sample(0.7, torch.Generator().manual_seed(1))
    b = gpu.sample(0.7, torch.Generator().manual_seed(1))
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
