"""Kronecker-factored (K-FAC) Laplace approximation over linear layers: the numerics, as pure functions.

References
  Ritter, Botev, Barber 2018, "A Scalable Laplace Approximation for Neural Networks" (K-FAC Laplace): the
      curvature of a linear weight W [out, in] is approximated by H ≈ G ⊗ A, A = E[a aᵀ] the input factor,
      G = E[g gᵀ] the output-gradient factor; the posterior precision is H + λI.
  Yang, Robeyns, Wang, Aitchison, ICLR 2024, "Bayesian Low-rank Adaptation for Large Language Models"
      (Laplace-LoRA): a factor too large to store is kept as low rank plus diagonal, accumulated incrementally
      by a thin SVD of [U diag(√s), xᵀ], so d×d is never formed.
  Immer et al. 2021, "Scalable Marginal Likelihood Estimation for Model Selection in Deep Learning" (eq. 4),
      after MacKay 1992: the Laplace evidence with the isotropic prior N(0, λ⁻¹ I) over P parameters,
      log p(D | λ) ≈ log p(D | θ*) − λ/2 ‖θ*‖² + P/2 log λ − 1/2 log det(H + λI)   (the 2π terms cancel).

Conventions. W is flattened row-major (index o·in + i), so vec(g aᵀ) = kron(g, a) and H = kron(G, A) in torch.kron
order. A symmetric PSD factor F [d, d] is a `Factor`: either full, F = Q diag(e) Qᵀ, or low rank plus diagonal,
F ≈ U diag(s) Uᵀ + diag(r) with U [d, k] orthonormal and r the exact diagonal's remainder. A `KronBlock` needs one
full side; in the full side's eigenbasis the precision splits into blocks e_i F_low + λI, each solved with the
matrix determinant lemma and Woodbury's identity in O(d k²). Factors are stored in float32; logdets and solves
run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import UqloraError

# fit_prior_precision: λ is searched in [PRIOR_PRECISION_MIN, PRIOR_PRECISION_MAX] by safeguarded Newton on
# d evidence / d log λ (bisection whenever a Newton step leaves the bracket), stopping once a step moves log λ by
# less than LOG_PRECISION_TOLERANCE or after MAX_FIT_STEPS steps (enough to bisect the whole bracket to tolerance).
PRIOR_PRECISION_MIN = 1e-10
PRIOR_PRECISION_MAX = 1e10
LOG_PRECISION_TOLERANCE = 1e-10
MAX_FIT_STEPS = 100

_KEYS = ("eigvecs", "eigvals", "residual")


@dataclass
class Factor:
    """A symmetric PSD matrix F [d, d] as its eigendecomposition: full (residual None) or low rank plus diagonal."""

    eigvecs: torch.Tensor  # [d, d] full or [d, k] low rank, orthonormal columns
    eigvals: torch.Tensor  # [d] or [k], >= 0 (descending when made by FactorAccumulator)
    residual: torch.Tensor | None  # None (full) or [d] >= 0: diag(F) - diag(U diag(s) Uᵀ)

    def __post_init__(self):
        problem = _shape_problem(self.eigvecs, self.eigvals, self.residual)
        if problem:
            raise UqloraError(f"bad factor: {problem}")

    @property
    def dim(self) -> int:
        return self.eigvecs.shape[0]

    @property
    def is_full(self) -> bool:
        return self.residual is None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.eigvecs, self.eigvals, self.residual) if t is not None)

    def dense(self) -> torch.Tensor:
        """F as a [d, d] matrix (tests and small sides only)."""
        F = (self.eigvecs * self.eigvals) @ self.eigvecs.T
        return F if self.is_full else F + torch.diag(self.residual)

    def scaled(self, c: float) -> Factor:
        """c · F for c >= 0."""
        if c < 0:
            raise UqloraError(f"a curvature factor can only be scaled by c >= 0, not {c}")
        return Factor(self.eigvecs, self.eigvals * c, None if self.is_full else self.residual * c)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: prefix.eigvecs, prefix.eigvals and (low rank only) prefix.residual."""
        tensors = {"eigvecs": self.eigvecs, "eigvals": self.eigvals, "residual": self.residual}
        return {f"{prefix}.{k}": t.contiguous() for k, t in tensors.items() if t is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str) -> Factor:
        for key in _KEYS[:2]:
            if f"{prefix}.{key}" not in state:
                raise UqloraError(f"curvature factor {prefix}: key {prefix}.{key} is missing from the saved state")
        eigvecs, eigvals = state[f"{prefix}.eigvecs"], state[f"{prefix}.eigvals"]
        residual = state.get(f"{prefix}.residual")
        problem = _shape_problem(eigvecs, eigvals, residual)
        if problem:
            raise UqloraError(f"curvature factor {prefix}: {problem}")
        return cls(eigvecs, eigvals, residual)


def _shape_problem(eigvecs, eigvals, residual) -> str | None:
    """What is wrong with these shapes, or None."""
    if eigvecs.ndim != 2 or eigvals.ndim != 1 or eigvecs.shape[1] != eigvals.shape[0]:
        return f"eigvecs {tuple(eigvecs.shape)} and eigvals {tuple(eigvals.shape)} are not [d, k] and [k]"
    d, k = eigvecs.shape
    if residual is None and k != d:
        return f"a full factor needs square eigvecs, got {tuple(eigvecs.shape)}"
    if residual is not None and tuple(residual.shape) != (d,):
        return f"residual {tuple(residual.shape)} does not match eigvecs {tuple(eigvecs.shape)}"
    return None


class FactorAccumulator:
    """F = Σ xᵀx over every row x ever added, in float32 on the given (or the first batch's) device.

    Sides <= max_full_dim are summed exactly as a d×d matrix. Larger sides keep the top-k eigenpairs (U, s),
    k = min(rank, dim), and the exact diagonal: each chunk of at most k rows updates (U, s) by the thin SVD of
    [U diag(√s), xᵀ] [d, <= 2k] (Yang et al. 2024), so the result is exact when the data has rank <= k and
    otherwise an incremental (streaming) top-k approximation.
    """

    def __init__(self, dim: int, *, max_full_dim: int, rank: int, device=None):
        if dim < 1 or rank < 1:
            raise UqloraError(f"a curvature factor needs dim >= 1 and rank >= 1, got dim {dim}, rank {rank}")
        self.dim = dim
        self.full = dim <= max_full_dim
        self.rank = min(rank, dim)
        self.rows_seen = 0
        self.device: torch.device | None = None
        self._state: dict[str, torch.Tensor] = {}
        if device is not None:
            self._init_state(torch.device(device))

    def _init_state(self, device: torch.device) -> None:
        self.device = device
        f32 = dict(dtype=torch.float32, device=device)
        if self.full:
            self._state = {"gram": torch.zeros(self.dim, self.dim, **f32)}
        else:  # any orthonormal basis with zero eigenvalues is the empty sum
            self._state = {"basis": torch.eye(self.dim, self.rank, **f32), "eigvals": torch.zeros(self.rank, **f32),
                           "diag": torch.zeros(self.dim, **f32)}

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x [n, dim] (any float dtype; n may be 0)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UqloraError(f"curvature factor of side {self.dim} got rows of shape {tuple(x.shape)}")
        if self.device is None:
            self._init_state(x.device)
        st = self._state
        x = x.to(device=self.device, dtype=torch.float32)  # [n, d]
        self.rows_seen += x.shape[0]
        if self.full:
            st["gram"] += x.T @ x
            return
        st["diag"] += (x * x).sum(0)
        for chunk in x.split(self.rank):  # [<= k, d]
            self._update_top(chunk)

    def _root(self) -> torch.Tensor:
        """U diag(√s) [d, k]: the low-rank part is root rootᵀ."""
        return self._state["basis"] * self._state["eigvals"].sqrt()

    def _update_top(self, chunk: torch.Tensor) -> None:
        """(U, s) <- top-k eigenpairs of U diag(s) Uᵀ + chunkᵀ chunk."""
        self._truncate(torch.cat([self._root(), chunk.T], dim=1))  # [d, k + c]

    def _truncate(self, thin: torch.Tensor) -> None:
        """(U, s) <- top-k eigenpairs of thin thinᵀ for thin [d, c] (c >= k), via QR and a small SVD."""
        Q, R = torch.linalg.qr(thin)  # [d, m], [m, c], m = min(d, c) >= k
        left, sing, _ = torch.linalg.svd(R.double(), full_matrices=False)  # [m, m], [m]
        self._state["basis"] = Q @ left[:, :self.rank].float()  # [d, k]
        self._state["eigvals"] = sing[:self.rank].square().float()  # [k], descending

    def summary(self) -> dict[str, torch.Tensor]:
        """What `merge` needs of this accumulator: rows [] (int64), and gram [d, d] (full side) or diag [d] and
        root U diag(√s) [d, k] (low rank)."""
        if self.device is None:
            self._init_state(torch.device("cpu"))
        rows = torch.tensor(self.rows_seen, device=self.device)
        if self.full:
            return {"rows": rows, "gram": self._state["gram"]}
        return {"rows": rows, "diag": self._state["diag"], "root": self._root()}

    def merge(self, summaries: list[dict[str, torch.Tensor]]) -> None:
        """Become the sum of the accumulators whose `summary()`s are given (processes that each added a share of
        the rows; every process passes the same list in the same order, so all end with the same factor).

        Rows, gram and diagonal add exactly. The low-rank part becomes the top k of Σ_p root_p root_pᵀ by the same
        truncated SVD `add` applies to each chunk: N streams and one more truncation instead of one stream. Both
        are exact when all the rows together have rank <= k; otherwise each keeps a low-rank part U diag(s) Uᵀ ⪯ F
        and drops the energy trace(F) − Σ s = Σ residual, so the two low-rank parts differ by at most the sum of
        what both dropped (in trace norm).
        """
        keys = {"rows", "gram"} if self.full else {"rows", "diag", "root"}
        sides = [s[k].shape[0] for s in summaries for k in keys - {"rows"} if k in s]
        if not summaries or any(set(s) != keys for s in summaries) or any(d != self.dim for d in sides):
            raise UqloraError(f"merging curvature factors of side {self.dim} needs summaries with {sorted(keys)} of "
                              f"that side, got {[{k: tuple(v.shape) for k, v in s.items()} for s in summaries][:2]}")
        if self.device is None:
            self._init_state(summaries[0]["rows"].device)
        self.rows_seen = int(sum(int(s["rows"]) for s in summaries))
        if self.full:
            self._state["gram"] = sum(s["gram"].to(self.device) for s in summaries)
            return
        self._state["diag"] = sum(s["diag"].to(self.device) for s in summaries)
        self._truncate(torch.cat([s["root"].to(self.device) for s in summaries], dim=1))  # [d, N k]

    def factor(self) -> Factor:
        """The accumulated F: full eigendecomposition (eigh in float64) or low rank plus diagonal, float32."""
        if self.device is None:
            self._init_state(torch.device("cpu"))
        st = self._state
        if self.full:
            eigvals, eigvecs = torch.linalg.eigh(st["gram"].double())  # ascending
            return Factor(eigvecs.flip(1).float(), eigvals.flip(0).clamp_min(0).float(), None)
        basis, eigvals = st["basis"].clone(), st["eigvals"].clone()
        residual = (st["diag"] - (basis.square() * eigvals).sum(1)).clamp_min(0)  # [d]
        return Factor(basis, eigvals, residual)


@dataclass
class KronBlock:
    """Curvature of one linear weight W [out, in]: H = kron(G, A), at least one side full."""

    A: Factor  # input side [in, in]
    G: Factor  # output side [out, out]

    def __post_init__(self):
        if not (self.A.is_full or self.G.is_full):
            raise UqloraError(f"a K-FAC block needs one full factor, but both sides are low rank "
                              f"(out {self.G.dim}, in {self.A.dim}); raise max_full_dim above one of them")

    @property
    def n_params(self) -> int:
        return self.G.dim * self.A.dim


def kron_dense(block: KronBlock) -> torch.Tensor:
    """H = kron(G, A) as a dense [out·in, out·in] matrix (tests and small blocks only)."""
    return torch.kron(block.G.dense(), block.A.dense())


def _precision(prior_precision: float | torch.Tensor, device) -> torch.Tensor:
    """λ as a float64 0-dim tensor on `device` (keeping its autograd graph); refuses λ <= 0."""
    if isinstance(prior_precision, torch.Tensor):
        lam = prior_precision.to(device=device, dtype=torch.float64)
    else:
        lam = torch.tensor(float(prior_precision), dtype=torch.float64, device=device)
    if lam.ndim != 0 or not bool(lam > 0):
        raise UqloraError(f"the prior precision must be one number > 0, got {prior_precision}")
    return lam


class _Woodbury(NamedTuple):
    """For each eigenvalue e_i of the full side, e_i F + λI with F = U diag(s) Uᵀ + diag(r) the low-rank side,
    written D_i + V_i V_iᵀ: D_i = e_i r + λ, V_i = U diag(√(e_i s)); capacitance C_i = I + V_iᵀ D_i⁻¹ V_i."""

    U: torch.Tensor  # [d, k]
    D: torch.Tensor  # [m, d]
    root: torch.Tensor  # [m, k]  √(e_i s)
    chol: torch.Tensor  # [m, k, k]  Cholesky factor of C_i

    @classmethod
    def build(cls, full_eigvals: torch.Tensor, low: Factor, lam: torch.Tensor) -> _Woodbury:
        e = full_eigvals.double().clamp_min(0)  # [m]
        U = low.eigvecs.double()  # [d, k]
        D = e[:, None] * low.residual.double().clamp_min(0) + lam  # [m, d]
        root = (e[:, None] * low.eigvals.double().clamp_min(0)).sqrt()  # [m, k]
        inner = torch.einsum("dk,md,dl->mkl", U, D.reciprocal(), U)  # [m, k, k]  Uᵀ D_i⁻¹ U
        eye = torch.eye(U.shape[1], dtype=torch.float64, device=U.device)
        capacitance = eye + root[:, :, None] * inner * root[:, None, :]  # [m, k, k]
        return cls(U, D, root, torch.linalg.cholesky(capacitance))

    def logdet(self) -> torch.Tensor:
        """Σ_i log det(D_i + V_i V_iᵀ) = Σ_i [log det D_i + log det C_i] (matrix determinant lemma)."""
        return self.D.log().sum() + 2 * self.chol.diagonal(dim1=-2, dim2=-1).log().sum()

    def solve(self, Z: torch.Tensor) -> torch.Tensor:
        """Row i of Z [..., m, d] times (D_i + V_i V_iᵀ)⁻¹ (Woodbury), [..., m, d]."""
        Y = Z / self.D  # D⁻¹ z
        T = (Y @ self.U) * self.root  # [..., m, k]  Vᵀ D⁻¹ z
        W = torch.cholesky_solve(T.unsqueeze(-1), self.chol).squeeze(-1)  # [..., m, k]  C⁻¹ Vᵀ D⁻¹ z
        return Y - ((W * self.root) @ self.U.T) / self.D


def block_logdet(block: KronBlock, prior_precision: torch.Tensor) -> torch.Tensor:
    """log det(kron(G, A) + λI) over the out·in parameters, float64, differentiable in λ.

    Both full: Σ_ij log(g_i a_j + λ). One low-rank side: Σ over the full side's eigenvalues e_i of
    log det(e_i F_low + λI) by the determinant lemma. Zero-curvature directions contribute log λ.
    """
    lam = _precision(prior_precision, block.A.eigvals.device)
    g, a = block.G.eigvals.double().clamp_min(0), block.A.eigvals.double().clamp_min(0)
    if block.A.is_full and block.G.is_full:
        return (g[:, None] * a[None, :] + lam).log().sum()
    if block.G.is_full:
        return _Woodbury.build(g, block.A, lam).logdet()
    return _Woodbury.build(a, block.G, lam).logdet()


def block_solve(block: KronBlock, prior_precision: float | torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(kron(G, A) + λI)⁻¹ vec(X) for X [..., out, in], returned as [..., out, in] in X's dtype.

    With G = Q_G diag(g) Q_Gᵀ, A = Q_A diag(a) Q_Aᵀ: (Q_G ⊗ Q_A)ᵀ vec(X) = vec(Q_Gᵀ X Q_A). Both full: divide by
    g_i a_j + λ there. One low-rank side: rotate by the full side only, then Woodbury per full eigenvalue.
    """
    if tuple(X.shape[-2:]) != (block.G.dim, block.A.dim):
        raise UqloraError(f"block_solve: X {tuple(X.shape)} does not end in the block's [{block.G.dim}, {block.A.dim}]")
    lam = _precision(prior_precision, X.device)
    Xd = X.double()
    QG, QA = block.G.eigvecs.double(), block.A.eigvecs.double()
    g, a = block.G.eigvals.double().clamp_min(0), block.A.eigvals.double().clamp_min(0)
    if block.A.is_full and block.G.is_full:
        Y = (QG.T @ Xd @ QA) / (g[:, None] * a[None, :] + lam)  # [..., out, in]
        out = QG @ Y @ QA.T
    elif block.G.is_full:  # rows of Q_Gᵀ X meet g_i A + λI
        out = QG @ _Woodbury.build(g, block.A, lam).solve(QG.T @ Xd)
    else:  # columns of X Q_A meet a_j G + λI
        Z = (Xd @ QA).transpose(-1, -2)  # [..., in, out]
        out = _Woodbury.build(a, block.G, lam).solve(Z).transpose(-1, -2) @ QA.T
    return out.to(X.dtype)


def block_quadratic(block: KronBlock, prior_precision: float | torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """J (H + λI)⁻¹ Jᵀ [..., C, C] for C Jacobian rows J [..., C, out, in] of this block (batch dims allowed)."""
    S = block_solve(block, prior_precision, J)  # [..., C, out, in]
    Q = torch.einsum("...coi,...doi->...cd", J, S)
    return (Q + Q.transpose(-1, -2)) / 2  # symmetric up to round-off; exact for later Cholesky factorisations


def log_marginal_likelihood(blocks: list[KronBlock], prior_precision: torch.Tensor, theta_sq_norm: float,
                            log_likelihood: float) -> torch.Tensor:
    """Laplace evidence (Immer et al. 2021 eq. 4) with prior N(0, λ⁻¹I) over P = Σ n_params, float64:
    log_likelihood − λ/2 ‖θ*‖² + P/2 log λ − 1/2 Σ_blocks log det(H_b + λI). Differentiable in λ."""
    if not blocks:
        raise UqloraError("the marginal likelihood needs at least one curvature block")
    lam = _precision(prior_precision, blocks[0].A.eigvals.device)
    P = sum(b.n_params for b in blocks)
    logdet = sum(block_logdet(b, lam) for b in blocks)
    return log_likelihood - lam / 2 * theta_sq_norm + P / 2 * lam.log() - logdet / 2


def _evidence_slope(blocks, theta_sq_norm: float, t: float) -> tuple[float, float]:
    """First and second derivatives of the evidence with respect to t = log λ, at t."""
    t = torch.tensor(t, dtype=torch.float64, device=blocks[0].A.eigvals.device, requires_grad=True)
    evidence = log_marginal_likelihood(blocks, t.exp(), theta_sq_norm, 0.0)
    (d1,) = torch.autograd.grad(evidence, t, create_graph=True)
    (d2,) = torch.autograd.grad(d1, t)
    return float(d1.detach()), float(d2)


def fit_prior_precision(blocks: list[KronBlock], theta_sq_norm: float, *, init: float = 1.0) -> float:
    """The λ in [PRIOR_PRECISION_MIN, PRIOR_PRECISION_MAX] maximising `log_marginal_likelihood`.

    The evidence is concave in λ (its second derivative −P/(2λ²) + 1/2 Σ_j (h_j + λ)⁻² is <= 0), so its
    derivative changes sign once: the root is bracketed in log λ and found by Newton steps, bisecting when a
    step leaves the bracket. Without curvature (H = 0) the evidence is −λ/2 ‖θ*‖² + const and the search ends
    at PRIOR_PRECISION_MIN; with ‖θ*‖² = 0 it ends at PRIOR_PRECISION_MAX.
    """
    lo, hi = math.log(PRIOR_PRECISION_MIN), math.log(PRIOR_PRECISION_MAX)
    t = min(max(math.log(init), lo), hi)
    for _ in range(MAX_FIT_STEPS):
        d1, d2 = _evidence_slope(blocks, theta_sq_norm, t)
        if d1 > 0:
            lo = t
        else:
            hi = t
        newton = t - d1 / d2 if d2 < 0 else math.nan
        step_to = newton if lo < newton < hi else (lo + hi) / 2
        if abs(step_to - t) < LOG_PRECISION_TOLERANCE:
            return math.exp(step_to)
        t = step_to
    return math.exp(t)
