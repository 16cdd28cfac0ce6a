"""Temperature scaling (Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks", Sec. 4.2).

Guo et al. divide a network's logits by one scalar T > 0, q = softmax(z / T), with T fitted by minimising the NLL
on held-out data. Here every method's predictive is S draws of class probabilities p_s [S, N, C] (S = 1 for a point
estimate; an absent choice has probability 0), so T rescales each draw,

    p_s^T = softmax(log p_s / T)       (exactly softmax(z / T) when p = softmax(z)),

and the predictive is the mean over draws, mean_s p_s^T. Absent choices keep log p = -inf, hence probability 0.
`fit_temperature` minimises the NLL of that predictive over log T (in float64): a log-spaced grid over
`TEMPERATURE_RANGE` brackets the minimum, and a golden-section search refines it to `LOG_T_TOLERANCE`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from uqlora.errors import UqloraError

TEMPERATURE_RANGE = (1e-2, 1e2)  # search range for T; fitted LLM temperatures lie well inside (roughly 0.3 to 5)
GRID_POINTS = 49  # log-spaced grid over TEMPERATURE_RANGE: steps of ln(1e4) / 48 ~ 0.19 in log T
LOG_T_TOLERANCE = 1e-6  # width of the final golden-section bracket in log T (relative precision of T)
GOLDEN = (math.sqrt(5) - 1) / 2  # golden-section ratio 0.618...


def apply_temperature(draw_probs: Tensor, temperature: float) -> Tensor:
    """[S, N, C] draws -> [S, N, C] draws softmax(log p_s / T) per draw; zero probabilities stay exactly 0."""
    _check_draws(draw_probs)
    if not (math.isfinite(temperature) and temperature > 0):
        raise UqloraError(f"The temperature must be a finite positive number, got {temperature}.")
    scaled = torch.log(draw_probs) / temperature  # [S, N, C]; log 0 = -inf
    return torch.exp(scaled - torch.logsumexp(scaled, dim=-1, keepdim=True))


def fit_temperature(draw_probs: Tensor, labels: Tensor) -> float:
    """T minimising the NLL of mean_s apply_temperature(draw_probs, T) [N, C] on labels [N]."""
    _check_draws(draw_probs)
    labels = labels.to(draw_probs.device)
    _check_labels(draw_probs, labels)
    log_probs = torch.log(draw_probs.to(torch.float64))  # [S, N, C]
    index = torch.arange(labels.numel(), device=labels.device)
    label_log_probs = log_probs[:, index, labels.long()]  # [S, N]

    def nll(log_t: float) -> float:
        scaled = log_probs / math.exp(log_t)  # [S, N, C]
        label_log_q = label_log_probs / math.exp(log_t) - torch.logsumexp(scaled, dim=-1)  # [S, N]
        log_mean = torch.logsumexp(label_log_q, dim=0) - math.log(draw_probs.shape[0])  # [N]
        return -log_mean.mean().item()

    grid = torch.linspace(math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1]), GRID_POINTS).tolist()
    values = [nll(x) for x in grid]
    best = min(range(GRID_POINTS), key=values.__getitem__)
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    log_t = _golden_section(nll, low, high)
    return math.exp(log_t if nll(log_t) <= values[best] else grid[best])


def _golden_section(fn: Callable[[float], float], low: float, high: float) -> float:
    """Minimiser of a unimodal fn on [low, high] to within LOG_T_TOLERANCE."""
    a, b = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    fa, fb = fn(a), fn(b)
    while high - low > LOG_T_TOLERANCE:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - GOLDEN * (high - low)
            fa = fn(a)
        else:
            low, a, fa = a, b, fb
            b = low + GOLDEN * (high - low)
            fb = fn(b)
    return (low + high) / 2


def _check_draws(draw_probs: Tensor) -> None:
    if draw_probs.ndim != 3:
        raise UqloraError(f"Draw probabilities must have shape [S, N, C], got {tuple(draw_probs.shape)}.")
    if not torch.isfinite(draw_probs).all() or (draw_probs < 0).any():
        raise UqloraError("Draw probabilities must be finite and non-negative.")
    if not (draw_probs.sum(dim=-1) > 0).all():
        raise UqloraError("Every draw must give some choice of every question a positive probability.")


def _check_labels(draw_probs: Tensor, labels: Tensor) -> None:
    n_questions, n_choices = draw_probs.shape[1:]
    if n_questions == 0:
        raise UqloraError("Fitting a temperature needs at least one labelled question.")
    if labels.shape != (n_questions,) or labels.is_floating_point() or labels.is_complex():
        raise UqloraError(f"Labels must be integers of shape [{n_questions}], got {labels.dtype} "
                          f"{tuple(labels.shape)}.")
    if ((labels < 0) | (labels >= n_choices)).any():
        raise UqloraError(f"Labels must index one of the {n_choices} choices.")
    index = torch.arange(n_questions, device=draw_probs.device)
    if not (draw_probs[:, index, labels.long()] > 0).any(dim=0).all():
        raise UqloraError("Every label must be a present choice (one with positive probability in some draw).")
