"""Calibration metrics, entropy/MI and the reliability diagram against independent oracles.

Oracles: scikit-learn (accuracy_score, log_loss, brier_score_loss), brute-force Python loops written straight
from PROTOCOL.md ("Predictive and metrics"), hand-computed values, and torchmetrics where its binning agrees.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from uqlora.errors import UqloraError
from uqlora.evaluation.metrics import (
    NLL_PROB_FLOOR,
    classification_metrics,
    mutual_information,
    predictive_entropy,
    reliability_bins,
)
from uqlora.evaluation.reliability import plot_reliability

N_BINS = (10, 15, 20)


def brute_force_calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[float, float]:
    """ECE and RMS-CE by a plain loop: bin m is ((m)/M, (m+1)/M], confidence 0 in the first bin."""
    count, correct, conf_sum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for row, label in zip(probs.tolist(), labels.tolist()):
        conf = max(row)
        pred = row.index(conf)
        m = next(m for m in range(n_bins) if conf <= (m + 1) / n_bins)
        count[m] += 1
        correct[m] += pred == label
        conf_sum[m] += conf
    n = len(labels)
    ece = sum(count[m] / n * abs(correct[m] / count[m] - conf_sum[m] / count[m]) for m in range(n_bins) if count[m])
    ms = sum(count[m] / n * (correct[m] / count[m] - conf_sum[m] / count[m]) ** 2 for m in range(n_bins) if count[m])
    return ece, math.sqrt(ms)


def check_against_oracles(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> None:
    """Every metric of classification_metrics against scikit-learn and the brute-force loop."""
    n_classes = probs.shape[1]
    got = classification_metrics(torch.from_numpy(probs), torch.from_numpy(labels), n_bins)
    ece, rms_ce = brute_force_calibration(probs, labels, n_bins)
    assert got["n"] == len(labels) and got["n_bins"] == n_bins
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(axis=1)), abs=1e-12)
    assert got["ece"] == pytest.approx(ece, abs=1e-12)
    assert got["rms_ce"] == pytest.approx(rms_ce, abs=1e-12)
    assert got["nll"] == pytest.approx(log_loss(labels, probs, labels=list(range(n_classes))), abs=1e-9)
    per_class = sum(brier_score_loss((labels == c).astype(int), probs[:, c], pos_label=1) for c in range(n_classes))
    assert got["brier"] == pytest.approx(per_class, abs=1e-12)
    assert got["brier"] == pytest.approx(((probs - np.eye(n_classes)[labels]) ** 2).sum(axis=1).mean(), abs=1e-12)
    assert all(isinstance(got[k], float) for k in ("accuracy", "ece", "rms_ce", "nll", "brier"))


def dirichlet(seed: int, n: int, n_classes: int, alpha: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Random predictive probabilities and labels drawn from them (roughly calibrated, varied confidences)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([alpha] * n_classes, size=n)
    labels = np.array([rng.choice(n_classes, p=row) for row in probs])
    return probs, labels


@pytest.mark.parametrize("n_bins", N_BINS)
@pytest.mark.parametrize("seed, n, n_classes", [(0, 500, 4), (1, 200, 2), (2, 300, 5), (3, 1, 4)])
def test_random_dirichlet_against_oracles(seed, n, n_classes, n_bins):
    """Random Dirichlet probabilities (including N=1): all metrics match sklearn and the brute-force loop."""
    check_against_oracles(*dirichlet(seed, n, n_classes), n_bins)


@pytest.mark.parametrize("n_bins", N_BINS)
def test_confidences_on_bin_edges(n_bins):
    """Confidences exactly k/M (every edge, incl. 0.5 and 1.0): brute force agrees, each lands in the bin it closes."""
    n_classes = 25  # enough columns that k/M can be the top-1 confidence for every k >= 1
    confs = np.array([k / n_bins for k in range(1, n_bins + 1)] + [0.5, 1.0])
    probs = np.empty((len(confs), n_classes))
    probs[:, 0] = confs
    probs[:, 1:] = ((1 - confs) / (n_classes - 1))[:, None]
    labels = np.arange(len(confs)) % 2  # label 0 (the top column) is correct, label 1 wrong ...
    labels[confs == 1.0] = 0  # ... but p(y) = 0 would compare NLL floors (ours vs sklearn's eps), not metrics
    check_against_oracles(probs, labels, n_bins)
    bins = reliability_bins(torch.from_numpy(probs), torch.from_numpy(labels), n_bins)
    for m, b in enumerate(bins):
        expected = sum(1 for c in confs if m / n_bins < c <= (m + 1) / n_bins)
        assert b["count"] == expected and b["hi"] == (m + 1) / n_bins


@pytest.mark.parametrize("n_bins", N_BINS)
def test_all_correct_and_padded_columns(n_bins):
    """All-correct labels and zero-padded choice columns: oracles agree, ACC = 1, padding changes nothing."""
    probs, _ = dirichlet(4, 100, 3)
    labels = probs.argmax(axis=1)
    padded = np.concatenate([probs, np.zeros((100, 2))], axis=1)  # questions with 3 of 5 possible choices
    check_against_oracles(padded, labels, n_bins)
    got, ref = (classification_metrics(torch.from_numpy(p), torch.from_numpy(labels), n_bins) for p in (padded, probs))
    assert got == ref and got["accuracy"] == 1.0


def test_hand_computed_example():
    """Four questions, 10 bins, every value worked out by hand (ECE 0.45, RMS-CE sqrt(0.2075), Brier 0.665)."""
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # bins: (0.9, 1] acc 1/2 conf 0.95; (0.6, 0.7] acc 1 conf 0.65; (0.5, 0.6] acc 0 conf 0.55
    got = classification_metrics(probs, labels, n_bins=10)
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["ece"] == pytest.approx(0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.55)  # 0.45
    assert got["rms_ce"] == pytest.approx(math.sqrt(0.5 * 0.45**2 + 0.25 * 0.35**2 + 0.25 * 0.55**2))
    assert got["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.05) + math.log(0.65) + math.log(0.45)) / 4)
    assert got["brier"] == pytest.approx((0.005 + 1.805 + 0.245 + 0.605) / 4)  # 0.665


def test_edge_convention_differs_from_torchmetrics():
    """Bins are closed on the right (Guo et al.): 0.5 falls in (0.4, 0.5] for 10 bins, so ECE = 0.525 by hand;
    torchmetrics closes bins on the left, merges it with 0.55 and reports 0.025 (why metrics.py bins itself)."""
    probs, labels = torch.tensor([[0.5, 0.5], [0.55, 0.45]], dtype=torch.float64), torch.tensor([0, 1])
    assert classification_metrics(probs, labels, 10)["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.55)
    assert multiclass_calibration_error(probs, labels, 2, n_bins=10).item() == pytest.approx(0.025, abs=1e-6)


@pytest.mark.parametrize("n_bins", N_BINS)
def test_agrees_with_torchmetrics_off_the_edges(n_bins):
    """Random probabilities (no confidence on an edge): ECE and RMS-CE match torchmetrics (float32, so 1e-5)."""
    probs, labels = dirichlet(5, 400, 4)
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    got = classification_metrics(p, y, n_bins)
    for key, norm in (("ece", "l1"), ("rms_ce", "l2")):
        ref = multiclass_calibration_error(p, y, 4, n_bins=n_bins, norm=norm).item()
        assert got[key] == pytest.approx(ref, abs=1e-5)


def test_nll_floor_keeps_zero_probability_finite():
    """A label with probability 0 costs -log(NLL_PROB_FLOOR), not infinity."""
    got = classification_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert got["nll"] == pytest.approx(-math.log(NLL_PROB_FLOOR))


def test_reliability_bins_against_loop():
    """Per-bin counts, accuracy and confidence match a brute-force loop; empty bins report None."""
    probs, labels = dirichlet(6, 60, 3)
    bins = reliability_bins(torch.from_numpy(probs), torch.from_numpy(labels), 15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 60
    for m, b in enumerate(bins):
        rows = [(r.max(), r.argmax() == y) for r, y in zip(probs, labels) if m / 15 < r.max() <= (m + 1) / 15]
        assert b["lo"] == pytest.approx(m / 15) and b["count"] == len(rows)
        if rows:
            assert b["accuracy"] == pytest.approx(np.mean([c for _, c in rows]))
            assert b["confidence"] == pytest.approx(np.mean([p for p, _ in rows]))
        else:
            assert b["accuracy"] is None and b["confidence"] is None


def brute_entropy(row) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def test_entropy_and_mutual_information_against_loops():
    """Entropy and MI = H(mean) - mean H against per-row Python loops, on samples with zero entries."""
    rng = np.random.default_rng(7)
    samples = rng.dirichlet([0.5] * 4, size=(6, 30))  # [S, N, C]
    samples[:, :5, 3] = 0  # some padded columns
    samples[:, :5] /= samples[:, :5].sum(axis=-1, keepdims=True)
    entropy = predictive_entropy(torch.from_numpy(samples[0]))
    assert entropy.shape == (30,)
    assert entropy.tolist() == pytest.approx([brute_entropy(r) for r in samples[0]], abs=1e-12)
    mi = mutual_information(torch.from_numpy(samples))
    expected = [brute_entropy(samples[:, i].mean(axis=0)) - np.mean([brute_entropy(s) for s in samples[:, i]])
                for i in range(30)]
    assert mi.shape == (30,) and mi.tolist() == pytest.approx(expected, abs=1e-12)


def test_mutual_information_known_values():
    """Identical samples give MI = 0; two confident samples that disagree give MI = ln 2 = H(mean)."""
    probs, _ = dirichlet(8, 20, 5)
    same = torch.from_numpy(probs).expand(7, 20, 5)
    assert mutual_information(same).tolist() == pytest.approx([0.0] * 20, abs=1e-12)
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [S=2, N=1, C=2]
    assert mutual_information(disagree).item() == pytest.approx(math.log(2))
    assert predictive_entropy(disagree.mean(dim=0)).item() == pytest.approx(math.log(2))


GOOD_PROBS, GOOD_LABELS = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1])


@pytest.mark.parametrize(
    "probs, labels, n_bins, match",
    [
        (torch.tensor([0.7, 0.3]), torch.tensor([0]), 15, "shape"),
        (GOOD_PROBS, torch.tensor([0]), 15, "shape"),
        (GOOD_PROBS, torch.tensor([[0], [1]]), 15, "shape"),
        (torch.empty(0, 2), torch.empty(0, dtype=torch.long), 15, "non-empty"),
        (GOOD_PROBS, torch.tensor([0, 2]), 15, "outside"),
        (GOOD_PROBS, torch.tensor([-1, 0]), 15, "outside"),
        (GOOD_PROBS, torch.tensor([0.0, 1.0]), 15, "integers"),
        (torch.tensor([[0.7, float("nan")], [0.2, 0.8]]), GOOD_LABELS, 15, "non-finite"),
        (torch.tensor([[1.2, -0.2], [0.2, 0.8]]), GOOD_LABELS, 15, "negative"),
        (torch.tensor([[0.7, 0.2], [0.2, 0.8]]), GOOD_LABELS, 15, "sums to"),
        (GOOD_PROBS, GOOD_LABELS, 0, "n_bins"),
        (GOOD_PROBS, GOOD_LABELS, 2.5, "n_bins"),
        (GOOD_PROBS, GOOD_LABELS, True, "n_bins"),
    ],
)
def test_invalid_inputs_raise(probs, labels, n_bins, match):
    """Malformed probabilities, labels or n_bins raise UqloraError with a sentence naming the problem."""
    with pytest.raises(UqloraError, match=match):
        classification_metrics(probs, labels, n_bins)
    with pytest.raises(UqloraError, match=match):
        reliability_bins(probs, labels, n_bins)


def test_invalid_sample_probs_raise():
    """mutual_information wants [S, N, C] distributions; entropy wants distributions."""
    with pytest.raises(UqloraError, match="shape"):
        mutual_information(GOOD_PROBS)
    with pytest.raises(UqloraError, match="sums to"):
        predictive_entropy(torch.tensor([[0.5, 0.2]]))


@pytest.mark.parametrize("n_bins", (10, 15))
def test_plot_reliability_writes_png(tmp_path, n_bins):
    """The plot writes a non-empty PNG (checked by its magic bytes) and leaves no temporary file behind."""
    probs, labels = dirichlet(9, 300, 4)
    path = tmp_path / "eval" / "arc-e" / "reliability.png"
    plot_reliability(torch.from_numpy(probs), torch.from_numpy(labels), n_bins, path, "map · ARC-Easy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]
