"""The linearised (GLM) Laplace predictive over the C class logits of a question.

Immer, Korzepa & Bauer (2021), "Improving predictions of Bayesian neural nets via local linearization", predict with
the network linearised at the MAP, f_lin(x, theta) = f(x, theta*) + J(x) (theta - theta*), so that under a Gaussian
posterior N(theta*, P^-1) the logits are Gaussian,

    f ~ N(mu, Sigma),   mu = f(x, theta*) [C],   Sigma = J(x) P^-1 J(x)^T [C, C]

(`glm_covariance` sums such quadratic terms over parameter blocks). The class probabilities E[softmax(f)] are then
approximated either by

  * the probit approximation (Spiegelhalter & Lauritzen 1990; MacKay 1992, "The evidence framework applied to
    classification networks") in its mean-field multiclass form (Lu, Ie & Sha 2020, "Mean-field approximation to
    Gaussian-softmax integral", eq. 12 with the pairwise variances): with d_ck = f_c - f_k,
        p_c ∝ 1 / Σ_k exp(-(mu_c - mu_k) / sqrt(1 + pi/8 * Var(d_ck)))                 -> `probit_probs`
    For C = 2 it is MacKay's binary probit of the logit difference. Unlike the per-class form
    softmax(mu_c / sqrt(1 + pi/8 Sigma_cc)) (laplace-torch), it does not change when a constant is added to every
    logit, as E[softmax(f)] does not: the cloze framing's scores are mean log-probabilities, all far below 0, and
    the per-class form turns a large variance into a large probability there.
  * or Monte Carlo: f_s = mu + L z_s with L L^T = Sigma, z_s ~ N(0, I), p_s = softmax(f_s) -> `sample_logit_probs`.

A logit mean of -inf marks an absent choice (a question with fewer than C options): its probability is exactly 0
and its row and column of Sigma are ignored (they may hold anything, even NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uqlora.errors import UqloraError

PROBIT_SCALE = math.pi / 8  # lambda^2 of the probit matching the logistic sigmoid: sigmoid(x) ~ Phi(sqrt(pi/8) x)

# Jitter added to the diagonal of Sigma (restricted to the present choices), relative to its mean diagonal, when the
# Cholesky factorisation fails. The factorisation runs in float64, but Sigma arrives in float32, whose relative
# round-off (~1.2e-7) can make a PSD Sigma slightly indefinite: 1e-6 covers that, 1e-8 handles milder cases with less
# distortion, and 1e-4 is the most we accept before projecting Sigma onto the PSD cone by an eigendecomposition.
RELATIVE_JITTERS = (1e-8, 1e-6, 1e-4)


def glm_covariance(jacobian_quadratic_blocks: list[Tensor]) -> Tensor:
    """Sigma = sum_k J_k P_k^-1 J_k^T from per-block terms [B, C, C], symmetrised as (Sigma + Sigma^T) / 2."""
    if not jacobian_quadratic_blocks:
        raise UqloraError("glm_covariance needs at least one [B, C, C] block.")
    shape = jacobian_quadratic_blocks[0].shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise UqloraError(f"GLM covariance blocks must have shape [B, C, C], got {tuple(shape)}.")
    total = torch.zeros_like(jacobian_quadratic_blocks[0])  # [B, C, C]
    for block in jacobian_quadratic_blocks:
        if block.shape != shape:
            raise UqloraError(f"GLM covariance blocks must share one shape, got {tuple(shape)} and "
                              f"{tuple(block.shape)}.")
        total = total + block
    return (total + total.transpose(1, 2)) / 2


def probit_probs(mean: Tensor, cov: Tensor) -> Tensor:
    """[B, C] mean-field probit probabilities (module docstring) for mean [B, C], cov [B, C, C]; absent -> 0."""
    present = _present_choices(mean, cov)  # [B, C]
    pair = present[:, :, None] & present[:, None, :]  # [B, C, C]
    cov = torch.where(pair, cov, 0.0)
    var = torch.diagonal(cov, dim1=1, dim2=2)  # [B, C]
    diff_var = (var[:, :, None] + var[:, None, :] - 2 * cov).clamp_min(0)  # [B, C, C] Var(f_c - f_k)
    mu = torch.where(present, mean, 0.0)
    gap = mu[:, :, None] - mu[:, None, :]  # [B, C, C] mu_c - mu_k
    exponent = torch.where(pair, -gap / torch.sqrt(1 + PROBIT_SCALE * diff_var), -math.inf)
    log_p = torch.where(present, -torch.logsumexp(exponent, dim=-1), -math.inf)  # [B, C] unnormalised
    return torch.softmax(log_p, dim=-1)


def sample_logit_probs(mean: Tensor, cov: Tensor, generators: list[torch.Generator]) -> Tensor:
    """[S, B, C] probabilities softmax(mu + L z_s), one draw per CPU generator (S = len(generators)); absent -> 0.

    Draw s takes z_s [B, C] from generators[s] in one float32 CPU call (then moved to mean's device), so the caller
    controls reproducibility by how it seeds the generators.
    """
    return torch.softmax(_sample_logits(mean, cov, generators), dim=-1)


def _sample_logits(mean: Tensor, cov: Tensor, generators: list[torch.Generator]) -> Tensor:
    """[S, B, C] logit draws mu + L z_s, -inf at absent choices."""
    present = _present_choices(mean, cov)  # [B, C]
    if not generators:
        raise UqloraError("sample_logit_probs needs at least one generator (one per draw).")
    factor = _sqrt_factor(cov, present).to(mean.dtype)  # [B, C, C]
    batch, n_choices = mean.shape
    z = torch.stack([torch.randn(batch, n_choices, generator=g, dtype=torch.float32) for g in generators])
    z = z.to(device=mean.device, dtype=mean.dtype)  # [S, B, C]
    draws = torch.where(present, mean, 0) + torch.einsum("bij,sbj->sbi", factor, z)  # [S, B, C]
    return torch.where(present, draws, -math.inf)


def _sqrt_factor(cov: Tensor, present: Tensor) -> Tensor:
    """[B, C, C] float64 L with L L^T = Sigma on the present choices and zero rows/cols at absent ones.

    Cholesky with no jitter first, then `RELATIVE_JITTERS` (only for the questions that still fail), then
    V sqrt(max(lambda, 0)) from the eigendecomposition Sigma = V diag(lambda) V^T.
    """
    pair = present[:, :, None] & present[:, None, :]  # [B, C, C]
    present64 = present.to(torch.float64)  # [B, C]
    # absent choices get a unit variance decoupled from the rest; the final mask removes them again
    cov = torch.where(pair, cov.to(torch.float64), 0) + torch.diag_embed(1 - present64)  # [B, C, C]
    mean_diag = (torch.diagonal(cov, dim1=1, dim2=2) * present64).sum(-1) / present64.sum(-1)  # [B]
    factor = torch.zeros_like(cov)
    todo = torch.arange(cov.shape[0], device=cov.device)  # questions not yet factorised
    for jitter in (0.0, *RELATIVE_JITTERS):
        shift = torch.diag_embed(jitter * mean_diag[todo, None] * present64[todo])  # [b, C, C]
        chol, info = torch.linalg.cholesky_ex(cov[todo] + shift)
        done = info == 0
        factor[todo[done]] = chol[done]
        todo = todo[~done]
        if todo.numel() == 0:
            return factor * pair
    eigvals, eigvecs = torch.linalg.eigh(cov[todo])  # [b, C], [b, C, C]
    factor[todo] = eigvecs * eigvals.clamp_min(0).sqrt()[:, None, :]
    return factor * pair


def _present_choices(mean: Tensor, cov: Tensor) -> Tensor:
    """[B, C] bool mask of present choices (finite mean); checks shapes and finiteness."""
    if mean.ndim != 2 or cov.shape != (*mean.shape, mean.shape[1]):
        raise UqloraError(f"GLM logits need mean [B, C] and cov [B, C, C], got {tuple(mean.shape)} and "
                          f"{tuple(cov.shape)}.")
    present = torch.isfinite(mean)
    if (torch.isnan(mean) | (mean == math.inf)).any():
        raise UqloraError("GLM logit means must be finite, or -inf for an absent choice (found NaN or +inf).")
    if not present.any(dim=1).all():
        raise UqloraError("Every question needs at least one present choice (a row of logit means is all -inf).")
    pair = present[:, :, None] & present[:, None, :]
    if not torch.isfinite(cov[pair]).all():
        raise UqloraError("GLM logit covariances must be finite on the present choices.")
    return present
