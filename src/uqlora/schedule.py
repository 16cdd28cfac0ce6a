"""The learning-rate schedule of every training: linear warm-up to the peak, then linear decay."""

from __future__ import annotations


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps to the peak, then linear decay; `step` is 0-based, never 0 lr."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(1, total - warmup)
