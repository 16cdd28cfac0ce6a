"""A grid of reliability diagrams, methods as rows and tasks as columns, binned as evaluation/metrics.py bins
(the same bins as each run's own reliability.png); each panel pools the predictions of all seeds."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..evaluation.metrics import classification_metrics, reliability_bins
from ..io import atomic_path

PANEL_INCHES = (2.6, 2.4)  # width, height of one diagram
DPI = 110


def reliability_grid(panels: dict[tuple[str, str], tuple], methods: list[str], tasks: list[str], n_bins: int,
                     path: Path) -> None:
    """Save one PNG: panel (method, task) shows accuracy per confidence bin against the diagonal for
    panels[(method, task)] = (probs [N, C], labels [N]); an absent key is an empty panel ("no results")."""
    fig = Figure(figsize=(PANEL_INCHES[0] * len(tasks), PANEL_INCHES[1] * len(methods)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(methods), len(tasks), sharex=True, sharey=True, squeeze=False)
    for i, method in enumerate(methods):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
            ax.set(xlim=(0, 1), ylim=(0, 1))
            if (method, task) in panels:
                _panel(ax, *panels[(method, task)], n_bins)
            else:
                ax.text(0.5, 0.5, "no results", ha="center", va="center", color="gray")
            if i == 0:
                ax.set_title(task, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{method}\naccuracy", fontsize=9)
            if i == len(methods) - 1:
                ax.set_xlabel("confidence (top-1)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _panel(ax, probs, labels, n_bins: int) -> None:
    """Bars of accuracy per non-empty bin, the gap to the bin's mean confidence shaded, ECE/ACC/N inside."""
    metrics = classification_metrics(probs, labels, n_bins)
    filled = [b for b in reliability_bins(probs, labels, n_bins) if b["count"]]
    centres = [(b["lo"] + b["hi"]) / 2 for b in filled]
    accuracy = [b["accuracy"] for b in filled]
    ax.bar(centres, accuracy, width=1.0 / n_bins, color="tab:blue", edgecolor="black", linewidth=0.4)
    ax.bar(centres, [b["confidence"] - a for b, a in zip(filled, accuracy)], bottom=accuracy, width=1.0 / n_bins,
           color="tab:red", alpha=0.3, edgecolor="tab:red", linewidth=0.4)
    ax.text(0.03, 0.97, f"ECE {100 * metrics['ece']:.1f}%\nACC {100 * metrics['accuracy']:.1f}%\n"
                        f"N {metrics['n']}", transform=ax.transAxes, va="top", fontsize=7)
