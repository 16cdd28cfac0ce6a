"""Pure numerics of SWAG for a flat parameter vector theta in R^P (Maddox et al. 2019, "A Simple Baseline for
Bayesian Uncertainty in Deep Learning", Algorithm 1 and Sec. 4.2, eq. for sampling).

Algorithm 1 keeps, over the n collected SGD iterates theta_1..theta_n,
    first moment   theta_bar   = (n theta_bar + theta_i) / (n + 1)
    second moment  theta_bar2  = (n theta_bar2 + theta_i^2) / (n + 1)
    deviations     D_hat       = last K columns theta_i - theta_bar_i (theta_bar AFTER the update)
and the SWAG posterior is N(theta_bar, Sigma) with
    Sigma = 1/2 * diag(theta_bar2 - theta_bar^2) + D_hat D_hat^T / (2 (K - 1)),
sampled without forming Sigma as
    theta~ = theta_bar + sqrt(Sigma_diag) z1 / sqrt(2) + D_hat z2 / sqrt(2 (K - 1)),  z1 ~ N(0, I_P), z2 ~ N(0, I_K).
Here D_hat is stored transposed (one deviation per ROW, [K, P]) and `scale` multiplies Sigma (the paper's
scale of the covariance at test time). With K' < K columns collected, K' replaces K; for K' < 2 the low-rank
term is dropped. `low_rank=False` keeps only theta_bar (SWA, Izmailov et al. 2018).
"""

from __future__ import annotations

import math

import torch

_LOW_RANK_KEYS = ("sq_mean", "deviations", "rank")


class SwagMoments:
    """Running SWAG statistics of a parameter vector theta in R^P, kept in float32."""

    def __init__(self, n_params: int, rank: int, device: torch.device | str = "cpu", low_rank: bool = True):
        if n_params < 1:
            raise ValueError(f"SWAG needs at least one parameter, got n_params={n_params}")
        if low_rank and rank < 1:
            raise ValueError(f"SWAG rank (number of deviation columns K) must be >= 1, got {rank}")
        self.n_params = int(n_params)
        self.rank = int(rank)
        self.low_rank = bool(low_rank)
        self.n_collected = 0
        self.mean = torch.zeros(n_params, dtype=torch.float32, device=device)  # [P]
        self.sq_mean: torch.Tensor | None = None  # [P]
        self.deviations: torch.Tensor | None = None  # [K, P] ring buffer, row n % K written next
        if low_rank:
            self.sq_mean = torch.zeros(n_params, dtype=torch.float32, device=device)
            self.deviations = torch.zeros(rank, n_params, dtype=torch.float32, device=device)

    # ----------------------------------------------------------------------------------------------- collection
    def collect(self, theta: torch.Tensor) -> None:
        """Add one snapshot theta [P] (Algorithm 1, moment and deviation updates)."""
        if theta.shape != (self.n_params,):
            raise ValueError(f"SWAG snapshot has shape {tuple(theta.shape)}, expected ({self.n_params},)")
        theta = theta.detach().to(device=self.mean.device, dtype=torch.float32)  # [P]
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("SWAG snapshot contains non-finite values")
        n = self.n_collected
        self.mean.mul_(n).add_(theta).div_(n + 1)
        if self.low_rank:
            self.sq_mean.mul_(n).add_(theta * theta).div_(n + 1)
            self.deviations[n % self.rank].copy_(theta - self.mean)  # overwrites the oldest once full
        self.n_collected = n + 1

    # ------------------------------------------------------------------------------------------------ moments
    def _require_low_rank(self, what: str) -> None:
        if not self.low_rank:
            raise ValueError(f"SWAG {what} is unavailable: statistics were kept with low_rank=False (SWA only)")

    def _require_snapshots(self) -> None:
        if self.n_collected == 0:
            raise ValueError("SWAG collected no snapshots: collect at least one parameter vector before using it")

    @property
    def n_kept(self) -> int:
        """K' = min(n_collected, K), the number of deviation columns held."""
        return min(self.n_collected, self.rank) if self.low_rank else 0

    def variance(self) -> torch.Tensor:
        """Diagonal variance [P]: clamp(theta_bar2 - theta_bar^2, min=0)."""
        self._require_low_rank("variance")
        return (self.sq_mean - self.mean * self.mean).clamp_(min=0.0)

    def deviation_matrix(self) -> torch.Tensor:
        """Kept deviations [K', P], oldest first (rows = columns of Maddox's D_hat)."""
        self._require_low_rank("deviation matrix")
        k = self.n_kept
        if self.n_collected <= self.rank:
            return self.deviations[:k].clone()
        start = self.n_collected % self.rank  # the slot written next holds the oldest column
        return torch.roll(self.deviations, shifts=-start, dims=0)

    def covariance_factors(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag [P], L [K', P]) with diag(diag) + L^T L = scale * (Sigma_diag / 2 + D D^T / (2 (K' - 1))).

        For K' < 2 the low-rank term is dropped and L has 0 rows."""
        self._require_low_rank("covariance")
        self._require_snapshots()
        _check_scale(scale)
        diag = self.variance().mul_(0.5 * scale)  # [P]
        dev = self.deviation_matrix()  # [K', P]
        k = dev.shape[0]
        if k < 2:
            return diag, dev[:0]
        return diag, dev.mul_(math.sqrt(scale / (2.0 * (k - 1))))  # [K', P]

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(self, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw theta~ [P] from N(theta_bar, scale * Sigma); a copy of theta_bar for scale 0 or SWA.

        z1 [P] then z2 [K'] are drawn on the CPU with `generator`, so a seed gives the same draw on any device."""
        self._require_snapshots()
        _check_scale(scale)
        if scale == 0 or not self.low_rank:
            return self.mean.clone()
        device = self.mean.device
        z1 = torch.randn(self.n_params, generator=generator, dtype=torch.float32).to(device)  # [P]
        out = self.variance().sqrt_().mul_(z1).mul_(1.0 / math.sqrt(2.0))  # [P]
        k = self.n_kept
        if k >= 2:
            z2 = torch.randn(k, generator=generator, dtype=torch.float32).to(device)  # [K']
            out.add_(z2 @ self.deviation_matrix(), alpha=1.0 / math.sqrt(2.0 * (k - 1)))  # D^T z2: [P]
        return out.mul_(math.sqrt(scale)).add_(self.mean)

    # ----------------------------------------------------------------------------------------------- (de)serialise
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors (safetensors-ready); deviations stored oldest first, [K', P]."""
        state = {"mean": self.mean.detach().cpu().contiguous(),
                 "n_collected": torch.tensor(self.n_collected, dtype=torch.int64)}
        if self.low_rank:
            state["sq_mean"] = self.sq_mean.detach().cpu().contiguous()
            state["deviations"] = self.deviation_matrix().cpu().contiguous()
            state["rank"] = torch.tensor(self.rank, dtype=torch.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> "SwagMoments":
        """Inverse of `state_dict`; the ring-buffer position is restored so collection continues unchanged."""
        for key in ("mean", "n_collected"):
            if key not in state:
                raise ValueError(f"SWAG state is missing {key!r}")
        present = [k for k in _LOW_RANK_KEYS if k in state]
        if present and len(present) != len(_LOW_RANK_KEYS):
            missing = [k for k in _LOW_RANK_KEYS if k not in state]
            raise ValueError(f"SWAG state is missing {', '.join(map(repr, missing))}")
        unknown = set(state) - {"mean", "n_collected", *_LOW_RANK_KEYS}
        if unknown:
            raise ValueError(f"SWAG state has unexpected keys: {', '.join(sorted(unknown))}")
        low_rank = bool(present)

        mean = _float_vector(state["mean"], "mean")
        n = _int_scalar(state["n_collected"], "n_collected")
        if n < 0:
            raise ValueError(f"SWAG state has negative n_collected={n}")
        rank = _int_scalar(state["rank"], "rank") if low_rank else 1
        if rank < 1:
            raise ValueError(f"SWAG state has rank={rank}, expected >= 1")
        obj = cls(mean.numel(), rank, device=device, low_rank=low_rank)
        obj.mean.copy_(mean)
        obj.n_collected = n
        if low_rank:
            sq_mean = _float_vector(state["sq_mean"], "sq_mean")
            if sq_mean.shape != mean.shape:
                raise ValueError(f"SWAG state sq_mean has shape {tuple(sq_mean.shape)}, mean {tuple(mean.shape)}")
            dev = state["deviations"]
            k = min(n, rank)
            if not isinstance(dev, torch.Tensor) or not dev.is_floating_point() or dev.shape != (k, mean.numel()):
                shape = tuple(dev.shape) if isinstance(dev, torch.Tensor) else type(dev).__name__
                raise ValueError(f"SWAG state deviations has shape {shape}, expected ({k}, {mean.numel()}) "
                                 f"= (min(n_collected, rank), P)")
            if not bool(torch.isfinite(dev).all()):
                raise ValueError("SWAG state deviations contains non-finite values")
            obj.sq_mean.copy_(sq_mean)
            # oldest-first row i lives at ring slot (start + i) % K, where start is the slot of the oldest kept row
            start = (n - k) % rank
            slots = (torch.arange(k) + start) % rank
            obj.deviations[slots.to(obj.deviations.device)] = dev.to(obj.deviations.device, torch.float32)
        return obj

    def nbytes(self) -> int:
        """Bytes held by the buffers: (K + 2) * P * 4 with low rank, P * 4 for SWA only."""
        bufs = [self.mean, self.sq_mean, self.deviations]
        return sum(b.numel() * b.element_size() for b in bufs if b is not None)


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"SWAG covariance scale must be finite and >= 0, got {scale}")


def _float_vector(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1 or t.numel() < 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"SWAG state {name} must be a non-empty 1-D float tensor, got {shape}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"SWAG state {name} contains non-finite values")
    return t.to(torch.float32)


def _int_scalar(t, name: str) -> int:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"SWAG state {name} must be an integer scalar tensor")
    return int(t.reshape(()).item())
