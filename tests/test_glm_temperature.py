"""The GLM Laplace predictive (probit and Monte Carlo over Gaussian logits) and temperature scaling, checked against
independent oracles: formulas evaluated by hand in Python floats, float64 numpy (Gauss-Hermite quadrature, numpy's
own multivariate normal sampler and Cholesky), and Monte Carlo moments within stated standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uqlora.errors import UqloraError
from uqlora.posthoc.glm import _sample_logits, _sqrt_factor, glm_covariance, probit_probs, sample_logit_probs
from uqlora.posthoc.temperature import apply_temperature, fit_temperature

MC_DRAWS = 20_000  # Monte Carlo draws for the moment checks
Z_TOLERANCE = 5.0  # allowed deviation in standard errors (a false alarm per check has probability ~6e-7)


pytestmark = pytest.mark.usefixtures("single_thread")


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1_000_003 * seed + s) for s in range(n)]


def random_cov(c: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A well-conditioned PD [C, C] covariance."""
    a = torch.randn(c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (scale * (a @ a.T / c + 0.2 * torch.eye(c, dtype=torch.float64))).float()


def cov_with_eigenvalues(eigvals: list[float], seed: int) -> torch.Tensor:
    """V diag(eigvals) V^T for a random orthogonal V, in float64."""
    a = torch.randn(len(eigvals), len(eigvals), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v, _ = torch.linalg.qr(a)
    return v @ torch.diag(torch.tensor(eigvals, dtype=torch.float64)) @ v.T


# ---------------------------------------------------------------- GLM predictive


def test_probit_zero_covariance_is_softmax():
    """Oracle: torch.softmax(mu) -- with Sigma = 0 the probit scaling is 1."""
    mean = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probit_probs(mean, torch.zeros(5, 4, 4)), torch.softmax(mean, dim=-1))


def test_probit_two_classes_by_hand():
    """Oracle: MacKay's binary probit sigmoid((mu_0 - mu_1) / sqrt(1 + pi/8 Var(f_0 - f_1))), in Python floats;
    the off-diagonal enters through Var(f_0 - f_1) = S00 + S11 - 2 S01."""
    mu, var, c01 = (0.7, -1.2), (2.5, 0.4), 0.3
    p0 = 1 / (1 + math.exp(-(mu[0] - mu[1]) / math.sqrt(1 + math.pi / 8 * (var[0] + var[1] - 2 * c01))))
    cov = torch.tensor([[[var[0], c01], [c01, var[1]]]])
    got = probit_probs(torch.tensor([mu]), cov)
    torch.testing.assert_close(got, torch.tensor([[p0, 1 - p0]]), rtol=1e-6, atol=1e-7)


def test_probit_ignores_a_shift_of_all_logits():
    """Oracle: E[softmax(f)] is unchanged by f -> f + c; so must the approximation be (cloze scores sit near -5)."""
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(8, 4, generator=gen)
    a = torch.randn(8, 4, 4, generator=gen)
    cov = a @ a.transpose(1, 2)
    torch.testing.assert_close(probit_probs(mean - 5.0, cov), probit_probs(mean, cov), rtol=1e-5, atol=1e-6)


def test_probit_close_to_monte_carlo():
    """Oracle: the mean of softmax over 200k independent MultivariateNormal draws (standard error < 0.002). The
    mean-field probit is an approximation: measured max error 0.051 per class on these 6 questions (covariance
    trace ≈ 1); asserted < 0.07, and for the same questions shifted by -5 (cloze-like scores) still < 0.07."""
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(6, 4, generator=gen)
    a = 0.5 * torch.randn(6, 4, 4, generator=gen)
    cov = a @ a.transpose(1, 2)
    torch.manual_seed(0)
    draws = torch.distributions.MultivariateNormal(mean, cov + 1e-6 * torch.eye(4)).sample((200_000,))
    exact = torch.softmax(draws, -1).mean(0)
    assert (probit_probs(mean, cov) - exact).abs().max() < 0.07
    assert (probit_probs(mean - 5, cov) - exact).abs().max() < 0.07


def test_probit_keeps_argmax_with_equal_variances():
    """Oracle: argmax of mu -- equal variances and covariances give every pair difference the same variance."""
    gen = torch.Generator().manual_seed(1)
    mean = 3 * torch.randn(64, 5, generator=gen)
    a = torch.randn(64, 5, 5, generator=gen)
    rho = torch.rand(64, 1, 1, generator=gen) * 0.9  # equicorrelated: Var(f_c - f_k) the same for all pairs
    cov = (10 * torch.rand(64, 1, 1, generator=gen)) * ((1 - rho) * torch.eye(5) + rho)
    assert torch.equal(probit_probs(mean, cov).argmax(-1), mean.argmax(-1))


def test_monte_carlo_mean_matches_quadrature_two_classes():
    """Oracle: E[softmax(f)_0] = E[sigmoid(f_0 - f_1)], f_0 - f_1 ~ N(mu_0 - mu_1, S00 + S11 - 2 S01), by 80-node
    Gauss-Hermite quadrature in float64; the Monte Carlo mean must agree within Z_TOLERANCE standard errors."""
    mean = torch.tensor([[0.5, -0.3], [2.0, 1.5]])
    cov = torch.stack([random_cov(2, 3, scale=2.0), random_cov(2, 4, scale=0.5)])
    probs = sample_logit_probs(mean, cov, generators(MC_DRAWS)).double()  # [S, B, 2]
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # for the weight exp(-x^2 / 2)
    c = cov.double().numpy()
    for b in range(2):
        m = float(mean[b, 0] - mean[b, 1])
        sd = math.sqrt(c[b, 0, 0] + c[b, 1, 1] - 2 * c[b, 0, 1])
        expected = float(np.sum(weights / (1 + np.exp(-(m + sd * nodes)))) / math.sqrt(2 * math.pi))
        se = probs[:, b, 0].std().item() / math.sqrt(MC_DRAWS)
        assert abs(probs[:, b, 0].mean().item() - expected) <= Z_TOLERANCE * se


def test_monte_carlo_mean_matches_independent_sampler_three_classes():
    """Oracle: E[softmax(f)] from 200k draws of numpy's multivariate normal (SVD-based) in float64; the two means
    must agree within Z_TOLERANCE combined standard errors."""
    mean = torch.tensor([[0.2, -0.4, 1.0], [0.0, 0.0, 0.0]])
    cov = torch.stack([random_cov(3, 5, scale=3.0), random_cov(3, 6)])
    probs = sample_logit_probs(mean, cov, generators(MC_DRAWS, seed=1)).double()  # [S, B, 3]
    rng = np.random.default_rng(0)
    n_oracle = 200_000
    for b in range(2):
        f = rng.multivariate_normal(mean[b].double().numpy(), cov[b].double().numpy(), size=n_oracle)
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        se = np.sqrt(probs[:, b].var(0).numpy() / MC_DRAWS + p.var(0) / n_oracle)
        assert np.all(np.abs(probs[:, b].mean(0).numpy() - p.mean(0)) <= Z_TOLERANCE * se)


def test_logit_draws_have_covariance_sigma():
    """Oracle: Sigma itself; the empirical covariance entry (i, j) of S Gaussian draws has standard error
    sqrt((S_ii S_jj + S_ij^2) / S)."""
    cov = random_cov(4, 7, scale=2.0)
    mean = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    logits = _sample_logits(mean, cov[None], generators(MC_DRAWS, seed=2))[:, 0].double()  # [S, 4]
    sigma = cov.double()
    empirical = torch.cov(logits.T)
    se = torch.sqrt((torch.outer(sigma.diagonal(), sigma.diagonal()) + sigma**2) / MC_DRAWS)
    assert torch.all((empirical - sigma).abs() <= Z_TOLERANCE * se)
    mean_se = torch.sqrt(sigma.diagonal() / MC_DRAWS)
    assert torch.all((logits.mean(0) - mean[0].double()).abs() <= Z_TOLERANCE * mean_se)


def test_sqrt_factor_cholesky_jitter_and_eigen_fallback():
    """Oracles: numpy's Cholesky for a PD Sigma; L L^T = Sigma up to the jitter for a Sigma with a -1e-7 eigenvalue;
    L = 0 for Sigma = 0; and the PSD projection V max(lambda, 0) V^T for a clearly indefinite Sigma."""
    pd = cov_with_eigenvalues([2.0, 1.0, 0.5], seed=8)
    rounded = cov_with_eigenvalues([1.0, 0.5, -1e-7], seed=9)
    indefinite_eigs = [1.5, 0.8, -0.3]
    indefinite = cov_with_eigenvalues(indefinite_eigs, seed=10)
    cov = torch.stack([pd, rounded, torch.zeros(3, 3, dtype=torch.float64), indefinite]).float()
    factor = _sqrt_factor(cov, torch.ones(4, 3, dtype=torch.bool))  # [4, 3, 3]
    np.testing.assert_allclose(factor[0].numpy(), np.linalg.cholesky(cov[0].double().numpy()), atol=1e-12)
    np.testing.assert_allclose((factor[1] @ factor[1].T).numpy(), cov[1].double().numpy(), atol=1e-5)
    assert torch.equal(factor[2], torch.zeros(3, 3, dtype=torch.float64))
    eigvals, eigvecs = np.linalg.eigh(cov[3].double().numpy())
    projection = eigvecs @ np.diag(np.maximum(eigvals, 0)) @ eigvecs.T
    np.testing.assert_allclose((factor[3] @ factor[3].T).numpy(), projection, atol=1e-10)


def test_rank_deficient_and_slightly_indefinite_covariances_sample_finite_probs():
    """Oracle: the axioms of a probability vector (finite, non-negative, summing to 1)."""
    covs = [cov_with_eigenvalues(e, seed=11) for e in ([1.0, 0.5, -1e-7], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0])]
    mean = torch.tensor([[0.3, -0.1, 0.8]] * 3)
    probs = sample_logit_probs(mean, torch.stack(covs).float(), generators(16))
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(16, 3))


def test_absent_choice_probit_is_zero_and_leaves_others_unchanged():
    """Oracle: the same question without the absent choice (whose Sigma row/col holds junk, even NaN)."""
    cov = random_cov(3, 12)
    cov[1, :] = float("nan")
    cov[:, 1] = 1e6
    with_absent = probit_probs(torch.tensor([[0.4, -math.inf, 1.0]]), cov[None])
    without = probit_probs(torch.tensor([[0.4, 1.0]]), cov[[0, 2]][:, [0, 2]][None])
    assert with_absent[0, 1].item() == 0.0
    torch.testing.assert_close(with_absent[:, [0, 2]], without)


def test_absent_choice_sampling_is_zero_and_leaves_others_unchanged():
    """Oracle: softmax over the present choices of mu_p + chol(Sigma_pp) z_p, with numpy's Cholesky of the present
    block and z re-drawn from identically seeded generators (z_p = the present columns of z)."""
    mean = torch.tensor([[0.4, -math.inf, 1.0, -0.3], [0.1, 0.2, -math.inf, -math.inf]])
    cov = torch.stack([random_cov(4, 13), random_cov(4, 14)])
    cov[0, 1, :] = float("nan")
    cov[1, 2:, :] = 1e6
    n_draws = 8
    probs = sample_logit_probs(mean, cov, generators(n_draws, seed=3))  # [S, 2, 4]
    z = torch.stack([torch.randn(2, 4, generator=g) for g in generators(n_draws, seed=3)]).double().numpy()
    for b, present in enumerate(([0, 2, 3], [0, 1])):
        absent = [c for c in range(4) if c not in present]
        assert torch.all(probs[:, b, absent] == 0)
        chol = np.linalg.cholesky(cov[b].double().numpy()[np.ix_(present, present)])
        f = mean[b, present].double().numpy() + z[:, b, present] @ chol.T  # [S, P]
        expected = np.exp(f - f.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose(probs[:, b, present].numpy(), expected, atol=1e-6)


def test_same_generators_give_identical_draws():
    """Oracle: bitwise equality for equal seeds, inequality for different seeds."""
    mean = torch.tensor([[0.2, -0.4, 1.0]])
    cov = random_cov(3, 15)[None]
    first = sample_logit_probs(mean, cov, generators(4, seed=5))
    assert torch.equal(first, sample_logit_probs(mean, cov, generators(4, seed=5)))
    assert not torch.equal(first, sample_logit_probs(mean, cov, generators(4, seed=6)))


def test_glm_covariance_sums_and_symmetrises():
    """Oracle: numpy float64 (sum_k A_k + (sum_k A_k)^T) / 2 for blocks with asymmetric round-off."""
    gen = torch.Generator().manual_seed(16)
    blocks = [torch.randn(3, 4, 4, generator=gen) for _ in range(3)]
    total = sum(b.double().numpy() for b in blocks)
    out = glm_covariance(blocks)
    np.testing.assert_allclose(out.numpy(), (total + total.transpose(0, 2, 1)) / 2, atol=1e-5)
    assert torch.equal(out, out.transpose(1, 2))


def test_glm_bad_input_raises():
    """Oracle: the documented input contract."""
    cov = torch.eye(3)[None]
    for mean in (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([[0.0, math.inf, 1.0]]),
                 torch.full((1, 3), -math.inf)):
        with pytest.raises(UqloraError):
            probit_probs(mean, cov)
    with pytest.raises(UqloraError):
        probit_probs(torch.zeros(1, 3), torch.eye(2)[None])
    with pytest.raises(UqloraError):
        sample_logit_probs(torch.zeros(1, 3), torch.full((1, 3, 3), float("nan")), generators(2))
    with pytest.raises(UqloraError):
        sample_logit_probs(torch.zeros(1, 3), cov, [])
    with pytest.raises(UqloraError):
        glm_covariance([])


# ---------------------------------------------------------------- temperature scaling


def numpy_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """-mean_n log mean_s softmax(logits_s / T)[y_n] in float64, straight from the logits [S, N, C]."""
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(-np.mean(np.log(p.mean(0)[np.arange(len(labels)), labels])))


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_recovers_a_known_temperature(true_temperature):
    """Labels drawn from softmax(z), model probabilities softmax(z * T_true): the NLL is minimised at T = T_true up
    to sampling noise. Oracle tolerance: the maximum-likelihood standard error of beta = 1/T from the Fisher
    information sum_n Var_{softmax(z_n)}(z_n T_true) is about 1% of beta here, so |beta error| <= Z_TOLERANCE
    standard errors, and the stricter 3% relative bound on T is still three standard errors."""
    gen = torch.Generator().manual_seed(17)
    z = 1.5 * torch.randn(20_000, 4, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)[:, 0]
    u = z * true_temperature  # the model's logits
    q = torch.softmax(z, -1)
    fisher = (q * u**2).sum(-1) - (q * u).sum(-1) ** 2  # [N] Var_q(u_n)
    se_beta = 1 / math.sqrt(fisher.sum().item())
    fitted = fit_temperature(torch.softmax(u, -1).float()[None], labels)
    assert abs(1 / fitted - 1 / true_temperature) <= Z_TOLERANCE * se_beta
    assert abs(fitted / true_temperature - 1) <= 0.03


def test_fitted_temperature_is_a_minimum():
    """Oracle: the NLL of mean_s softmax(logits_s / T) computed by numpy from the logits (never from the
    probabilities) is no lower at T = 1, 1.1 T or T / 1.1 than at the fitted T (S = 3 draws)."""
    gen = torch.Generator().manual_seed(18)
    base = 2.5 * torch.randn(2_000, 5, generator=gen, dtype=torch.float64)
    logits = base + 0.7 * torch.randn(3, 2_000, 5, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(base / 2.5, -1), 1, generator=gen)[:, 0]
    fitted = fit_temperature(torch.softmax(logits, -1), labels)
    nll = lambda t: numpy_nll(logits.numpy(), labels.numpy(), t)  # noqa: E731
    best = nll(fitted)
    assert all(best <= nll(t) + 1e-12 for t in (1.0, 1.1 * fitted, fitted / 1.1))
    assert abs(fitted - 1) > 0.1  # the miscalibration is real, so the comparison with T = 1 is informative


def test_temperature_one_is_identity():
    """Oracle: the input draws themselves."""
    probs = torch.softmax(torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(19)), -1)
    torch.testing.assert_close(apply_temperature(probs, 1.0), probs)


def test_point_estimate_equals_softmax_of_scaled_logits():
    """Oracle: torch.softmax(logits / T) for S = 1."""
    logits = 3 * torch.randn(8, 5, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    for t in (0.3, 1.7):
        got = apply_temperature(torch.softmax(logits, -1)[None], t)[0]
        torch.testing.assert_close(got, torch.softmax(logits / t, -1))


def test_absent_choices_stay_exactly_zero():
    """Oracle: softmax of the present logits / T, and exact zeros at the absent choices."""
    logits = torch.tensor([[[0.5, -math.inf, 1.5, -1.0]], [[0.1, -math.inf, -0.2, 0.3]]])  # [S=2, N=1, C=4]
    probs = torch.softmax(logits, -1)
    for t in (0.25, 4.0):
        got = apply_temperature(probs, t)
        assert torch.all(got[..., 1] == 0)
        torch.testing.assert_close(got[..., [0, 2, 3]], torch.softmax(logits[..., [0, 2, 3]] / t, -1))


def test_temperature_bad_input_raises():
    """Oracle: the documented input contract."""
    probs = torch.tensor([[[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]]])  # [S=1, N=2, C=3]; choice 1 absent in question 0
    for labels in (torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([1, 0]), torch.tensor([0.0, 1.0]),
                   torch.tensor([0])):
        with pytest.raises(UqloraError):
            fit_temperature(probs, labels)
    with pytest.raises(UqloraError):
        fit_temperature(torch.zeros(1, 0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(UqloraError):
        fit_temperature(torch.tensor([[[0.5, float("nan"), 0.5]]]), torch.tensor([0]))
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UqloraError):
            apply_temperature(probs, t)
