"""Reliability diagram above a confidence histogram (Guo et al., 2017, Fig. 1), binned as in metrics.py."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uqlora.evaluation.metrics import classification_metrics, reliability_bins
from uqlora.io import atomic_path

FIGSIZE = (5.0, 6.5)  # inches
DPI = 120


def plot_reliability(probs, labels, n_bins: int, path: str | os.PathLike, title: str) -> None:
    """Save a PNG of accuracy per confidence bin (bars, gap to the diagonal shaded) over counts per bin.

    probs [N, C] predictive probabilities, labels [N]. Uses the Agg canvas directly (no display, no pyplot state).
    """
    metrics = classification_metrics(probs, labels, n_bins)
    bins = reliability_bins(probs, labels, n_bins)
    mean_conf = sum(b["confidence"] * b["count"] for b in bins if b["count"]) / metrics["n"]
    filled = [b for b in bins if b["count"]]
    centres = [(b["lo"] + b["hi"]) / 2 for b in filled]
    width = 1.0 / n_bins

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})

    top.bar(centres, [b["accuracy"] for b in filled], width=width, color="tab:blue", edgecolor="black",
            linewidth=0.6, label="Accuracy")
    top.bar(centres, [b["confidence"] - b["accuracy"] for b in filled], bottom=[b["accuracy"] for b in filled],
            width=width, color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6,
            label="Gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy")
    top.set_title(f"{title}\nECE {100 * metrics['ece']:.1f}%  ·  ACC {100 * metrics['accuracy']:.1f}%  ·  "
                  f"N = {metrics['n']}, {n_bins} bins", fontsize=10)
    top.legend(loc="upper left", fontsize=8)

    bottom.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["count"] for b in bins], width=width,
               color="tab:gray", edgecolor="black", linewidth=0.6)
    bottom.axvline(mean_conf, color="tab:red", linestyle="--", label=f"Mean confidence {100 * mean_conf:.1f}%")
    bottom.axvline(metrics["accuracy"], color="tab:blue", label=f"Accuracy {100 * metrics['accuracy']:.1f}%")
    bottom.set(xlim=(0, 1), xlabel="Confidence (top-1)", ylabel="Count")
    bottom.legend(loc="upper left", fontsize=7)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
