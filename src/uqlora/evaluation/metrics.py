"""Calibration metrics from predictive probabilities (PROTOCOL.md, "Predictive and metrics").

`probs` are the predictive probabilities p̄ [N, C] (sampling methods average probabilities over samples first);
questions with fewer than C choices carry probability 0 in their padded columns. The prediction is argmax p̄,
the top-1 confidence is max p̄.

Binning (ECE, RMS-CE, reliability diagram): `n_bins` equal-width bins on [0, 1], closed on the right as in
Guo et al. (2017): bin m holds confidences in ((m-1)/M, m/M], and confidence 0 falls in the first bin. We bin
ourselves rather than call torchmetrics' MulticlassCalibrationError because, as of torchmetrics 1.9, it uses
`bucketize(right=True)`, i.e. bins closed on the left, so a confidence exactly on an edge (0.5 with an even number
of bins) lands one bin higher, and a confidence of exactly 1.0 gets an extra (M+1)-th bin of its own; it also
casts to float32. Off the edges the two agree (tests/test_metrics.py checks both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from uqlora.errors import UqloraError

SUM_TOLERANCE = 1e-3  # |Σ_c p_c − 1| allowed per row (covers float32 averaging and probabilities rounded on disk)
NLL_PROB_FLOOR = 1e-12  # p(y) is clamped here so NLL stays finite (−log 1e-12 ≈ 27.6 nats) when p(y) = 0
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_probs(probs, name: str = "probs") -> Tensor:
    """Return `probs` as float64 after checking that every row along the last axis is a distribution."""
    probs = torch.as_tensor(probs)
    if probs.dtype == torch.bool or probs.is_complex():
        raise UqloraError(f"{name} must hold real probabilities, got dtype {probs.dtype}.")
    probs = probs.to(torch.float64)
    if probs.ndim == 0 or probs.shape[-1] == 0 or probs.numel() == 0:
        raise UqloraError(f"{name} must be non-empty with choices on the last axis, got shape {tuple(probs.shape)}.")
    rows = probs.reshape(-1, probs.shape[-1])  # [R, C]
    bad = ~torch.isfinite(rows).all(dim=1)
    if bad.any():
        raise UqloraError(f"{name} row {int(bad.nonzero()[0])} has a non-finite value.")
    bad = (rows < 0).any(dim=1)
    if bad.any():
        raise UqloraError(f"{name} row {int(bad.nonzero()[0])} has a negative probability.")
    sums = rows.sum(dim=1)  # [R]
    bad = (sums - 1).abs() > SUM_TOLERANCE
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UqloraError(f"{name} row {i} sums to {float(sums[i]):.6g}, not 1 (tolerance {SUM_TOLERANCE}).")
    return probs


def _check_inputs(probs, labels, n_bins: int | None = None) -> tuple[Tensor, Tensor]:
    """Validate probs [N, C], labels [N] and n_bins; return (float64 probs, int64 labels)."""
    probs = _check_probs(probs)
    if probs.ndim != 2:
        raise UqloraError(f"probs must have shape [N, C], got {tuple(probs.shape)}.")
    labels = torch.as_tensor(labels)
    if labels.dtype not in _INTEGER_DTYPES:
        raise UqloraError(f"labels must be integers, got dtype {labels.dtype}.")
    if labels.shape != probs.shape[:1]:
        raise UqloraError(f"labels must have shape [{probs.shape[0]}] to match probs, got {tuple(labels.shape)}.")
    bad = (labels < 0) | (labels >= probs.shape[1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UqloraError(f"label {int(labels[i])} at row {i} is outside 0..{probs.shape[1] - 1}.")
    if n_bins is not None and (isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1):
        raise UqloraError(f"n_bins must be an integer >= 1, got {n_bins!r}.")
    return probs, labels.to(torch.int64)


def _bin_sums(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (count, Σ correct, Σ confidence), each [n_bins], for validated float64 inputs."""
    conf, pred = probs.max(dim=1)  # [N], [N]; ties resolve to the first maximal column
    correct = (pred == labels).to(torch.float64)  # [N]
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins  # [M-1]: 1/M .. (M-1)/M
    idx = torch.bucketize(conf, inner_edges, right=False)  # [N]: m with edge[m-1] < conf <= edge[m]
    zeros = torch.zeros(n_bins, dtype=torch.float64)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    return count, zeros.index_add(0, idx, correct), zeros.index_add(0, idx, conf)


def _calibration_errors(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[float, float]:
    """(ECE, RMS-CE): Σ_b (n_b/N)|acc_b − conf_b| and sqrt(Σ_b (n_b/N)(acc_b − conf_b)²)."""
    count, correct, conf = _bin_sums(probs, labels, n_bins)
    filled = count > 0
    gap = (correct[filled] - conf[filled]) / count[filled]  # acc_b − conf_b over non-empty bins
    weight = count[filled] / probs.shape[0]
    return float((weight * gap.abs()).sum()), float((weight * gap**2).sum().sqrt())


def classification_metrics(probs, labels, n_bins: int = 15) -> dict:
    """ACC, ECE, RMS-CE, NLL and Brier of predictive probabilities probs [N, C] against labels [N].

    Returns plain Python numbers: accuracy, ece, rms_ce, nll (nats, p(y) clamped at NLL_PROB_FLOOR), brier
    (Σ over classes, so in [0, 2]), n, n_bins. Raises UqloraError on malformed input.
    """
    probs, labels = _check_inputs(probs, labels, n_bins)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(torch.float64)  # [N, C]
    p_true = probs.gather(1, labels[:, None]).squeeze(1)  # [N]
    ece, rms_ce = _calibration_errors(probs, labels, n_bins)
    return {
        "accuracy": float((probs.argmax(dim=1) == labels).to(torch.float64).mean()),
        "ece": ece,
        "rms_ce": rms_ce,
        "nll": float(-p_true.clamp_min(NLL_PROB_FLOOR).log().mean()),
        "brier": float(((probs - onehot) ** 2).sum(dim=1).mean()),
        "n": int(probs.shape[0]),
        "n_bins": n_bins,
    }


def reliability_bins(probs, labels, n_bins: int = 15) -> list[dict]:
    """One dict per bin, in order: lo, hi (edges), count, accuracy and mean confidence (None for empty bins)."""
    probs, labels = _check_inputs(probs, labels, n_bins)
    count, correct, conf = _bin_sums(probs, labels, n_bins)
    return [
        {
            "lo": m / n_bins,
            "hi": (m + 1) / n_bins,
            "count": int(count[m]),
            "accuracy": float(correct[m] / count[m]) if count[m] > 0 else None,
            "confidence": float(conf[m] / count[m]) if count[m] > 0 else None,
        }
        for m in range(n_bins)
    ]


def predictive_entropy(probs) -> Tensor:
    """H(p) = −Σ_c p_c log p_c in nats (0 log 0 = 0) over the last axis: probs [N, C] -> [N] (float64)."""
    return torch.special.entr(_check_probs(probs)).sum(dim=-1)


def mutual_information(sample_probs) -> Tensor:
    """Mutual information H(mean_s p_s) − mean_s H(p_s) in nats: sample_probs [S, N, C] -> [N] (float64).

    The OOD score for sampling methods (PROTOCOL.md). Mathematically >= 0; float rounding below 0 is clamped to 0.
    """
    sample_probs = _check_probs(sample_probs, "sample_probs")
    if sample_probs.ndim != 3:
        raise UqloraError(f"sample_probs must have shape [S, N, C], got {tuple(sample_probs.shape)}.")
    total = predictive_entropy(sample_probs.mean(dim=0))  # [N]
    expected = predictive_entropy(sample_probs).mean(dim=0)  # [N]
    return (total - expected).clamp_min(0.0)
