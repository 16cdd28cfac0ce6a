"""Post-hoc fits on a trained run: `uqlora posthoc RUN --method laplace|laplace-ll|temperature|swag-scale --out DIR`
copies RUN into DIR (adapter, posterior, members) and fits there; `uqlora train --method laplace` fits in place.

DESIGN.md sketches a `Method.fit(model, loader)`; the fits live here instead because they need what a method
never sees (the run directory, its training and validation questions, the framing), and because a temperature
fit wraps another method's whole predictive. The methods (methods/laplace.py, temperature.py) only read the
fitted state at evaluation.

Questions: the Laplace curvature is summed over the questions the run trained on (its TrainConfig selects them
again); the validation questions (prior by val-nll, temperature, SWAG scale) are the run's held-out slice when it
has one, else up to `val_examples` questions of its training split it did not train on, drawn with VAL_SEED.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import runs
from ..config import TrainConfig, from_mapping
from ..data import load_questions
from ..data.question import Question
from ..errors import UqloraError
from ..framing import class_scores
from ..io import atomic_path, write_json
from ..memory import peak_memory, reset_peak_memory
from .curvature import batch_logit_jacobians, fit_kfac, logit_covariance, lora_linears
from .glm import probit_probs
from .kfac import fit_prior_precision, log_marginal_likelihood

POSTHOC_METHODS = ("laplace", "laplace-ll", "temperature", "swag-scale")
LAPLACE_BASES = ("map", "mc-dropout", "swa")  # runs whose adapter is one point estimate
# SWAG covariance scales tried first by swag-scale, a factor SCALE_STEP apart: 1 is Maddox et al.'s sampling, 0.25
# narrower, 4-64 wider (OBQA, 10 epochs: scale 16 took ECE from MAP's 24.8 % to 14.7 %; BENCHMARKS.md, the SWAG
# diagnosis). While the best is an end of what was tried, the next scale beyond it is tried, within SCALE_LIMITS.
SCALE_GRID = (0.25, 1.0, 4.0, 16.0, 64.0)
SCALE_STEP = 4.0
SCALE_LIMITS = (4.0 ** -4, 4.0 ** 6)  # 1/256 .. 4096
POSTHOC_OPTIONS = ("curvature", "kfac_max_full_dim", "kfac_rank", "prior_fit", "link", "val_examples")
VAL_SEED = 0
# prior precisions tried by prior_fit=val-nll: 10^-2 .. 10^6, two per decade
PRIOR_GRID = tuple(10.0 ** (e / 2) for e in range(-4, 13))
PROB_FLOOR = torch.finfo(torch.float64).tiny  # log(0) guard for a validation NLL
COPIED = (runs.ADAPTER, runs.POSTERIOR, runs.MEMBERS, runs.TRAIN_LOG, runs.SUMMARY)


def training_questions(config: TrainConfig) -> tuple[list[Question], list[Question]]:
    """The questions the run trained on and its held-out slice, selected as `uqlora train` selected them."""
    from ..train import split_held_out

    questions = load_questions(config.task, config.split, data_dir=config.data_dir, source=config.source,
                               max_examples=config.max_examples)
    return split_held_out(questions, config.val_fraction)


def validation_questions(config: TrainConfig) -> list[Question]:
    trained, held_out = training_questions(config)
    if held_out:
        return held_out
    seen = {q.id for q in trained}
    rest = [q for q in load_questions(config.task, config.split, data_dir=config.data_dir, source=config.source)
            if q.id not in seen]
    if not rest:
        raise UqloraError(f"the run trained on every question of {config.task}/{config.split}, so none is left "
                          "to validate on; train with --val-fraction or --max-examples")
    keep = sorted(random.Random(VAL_SEED).sample(range(len(rest)), min(config.val_examples, len(rest))))
    return [rest[i] for i in keep]


def posthoc(run_dir: Path, out: Path, method: str, options: dict, *, quiet: bool = False) -> Path:
    """Fit `method` on the trained run `run_dir` into the new run directory `out`."""
    from ..train import run_directory

    run_dir, out = Path(run_dir), Path(out)
    saved = runs.read_config(run_dir)
    base = saved["method"]
    if method not in POSTHOC_METHODS:
        raise UqloraError(f"posthoc --method must be one of {', '.join(POSTHOC_METHODS)}, got {method!r}")
    if method in ("laplace", "laplace-ll") and base not in LAPLACE_BASES:
        raise UqloraError(f"{method} needs a run with one point-estimate adapter ({', '.join(LAPLACE_BASES)}); "
                          f"{run_dir} is a {base} run")
    if method == "swag-scale" and base != "swag":
        raise UqloraError(f"swag-scale chooses the scale of a swag run's posterior; {run_dir} is a {base} run")
    if method == "temperature" and (base in ("temperature", "zero-shot") or "task" not in saved):
        raise UqloraError(f"temperature scaling needs a trained run with a task; {run_dir} is a {base} run")
    if not (run_dir / runs.SUMMARY).is_file():
        raise UqloraError(f"{run_dir} has not finished training ({runs.SUMMARY} is missing)")
    if out.exists() and any(out.iterdir()):
        raise UqloraError(f"{out} already exists and is not empty; choose another --out")
    unknown = sorted(set(options) - set(POSTHOC_OPTIONS))
    if unknown:
        raise UqloraError(f"posthoc options {unknown} are not post-hoc options ({', '.join(POSTHOC_OPTIONS)})")
    values = {**saved, **options, "method": method, "base_method": base if method == "temperature" else None}
    config = from_mapping(values, f"posthoc {run_dir}")

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=config.device == "cpu")
    accelerator.wait_for_everyone()  # every process has checked --out before the main one writes there
    with run_directory(out, values, False, accelerator):
        if accelerator.is_main_process:
            runs.copy_entries(run_dir, out, COPIED)
        accelerator.wait_for_everyone()
        fit_run(out, config, quiet=quiet)
    return out


def fit_run(run_dir: Path, config: TrainConfig, *, model=None, tokenizer=None, framing=None, accelerator=None,
            quiet: bool = False) -> dict:
    """Fit the post-hoc method of `config` in `run_dir`; a model already holding the run's adapter may be given,
    with the accelerator of its processes. Every process fits its share; the main one writes the files."""
    if config.method == "temperature":
        return fit_temperature_run(run_dir, config, quiet)
    if config.method == "swag-scale":
        return fit_swag_scale_run(run_dir, config, quiet)
    if model is None:
        from ..evaluate import open_run

        _, model, tokenizer, framing, accelerator = open_run(run_dir, {**config.to_dict(), "method": "map"}, "map",
                                                             {}, quiet=quiet)
    return fit_laplace(run_dir, config, model, tokenizer, framing, accelerator, quiet)


def fit_laplace(run_dir: Path, config: TrainConfig, model, tokenizer, framing: str, accelerator,
                quiet: bool) -> dict:
    """K-FAC over the training questions, the prior precision, then posterior/laplace{.safetensors,.json}.

    The processes of `accelerator` share the questions (fit_kfac, prior_by_validation_nll) and end with the same
    factors and prior; the main process writes the posterior, each file whole or not at all, the others wait."""
    from ..methods.laplace import blocks_state

    linears = lora_linears(model, last_layer=config.method == "laplace-ll")
    params = [m.weight for m in linears.values()]
    for p in params:
        p.requires_grad_(True)

    def score_fn(qs):
        return class_scores(framing, model, tokenizer, qs, config.max_length)

    train_qs, _ = training_questions(config)
    reset_peak_memory(params[0].device)
    start = time.perf_counter()
    fit = fit_kfac(model, linears, score_fn, train_qs, curvature=config.curvature, batch_size=config.batch_size,
                   max_full_dim=config.kfac_max_full_dim, rank=config.kfac_rank, seed=config.seed, quiet=quiet,
                   accelerator=accelerator)
    fit_seconds = time.perf_counter() - start
    blocks = list(fit.blocks.values())
    theta_sq = sum(float(p.detach().float().pow(2).sum()) for p in params)
    start = time.perf_counter()
    val_nll = None
    if config.prior_fit == "marglik":
        prior = fit_prior_precision(blocks, theta_sq)
    else:
        prior, val_nll = prior_by_validation_nll(blocks, linears, score_fn, validation_questions(config),
                                                 config.batch_size, accelerator, quiet)
    evidence = float(log_marginal_likelihood(blocks, torch.tensor(prior, dtype=torch.float64), theta_sq,
                                             fit.log_likelihood))
    state = blocks_state(fit.blocks, prior)
    summary = {
        "method": config.method, "curvature": config.curvature, "prior_fit": config.prior_fit,
        "prior_precision": prior, "log_marginal_likelihood": evidence, "validation_nll": val_nll,
        "train_questions": fit.questions, "linears": len(blocks), "parameters": sum(b.n_params for b in blocks),
        "low_rank_factors": sum(not f.is_full for b in blocks for f in (b.A, b.G)),
        "factor_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "fit_seconds": round(fit_seconds, 2), "factor_seconds": round(fit.factor_seconds, 2),
        "prior_seconds": round(time.perf_counter() - start, 2), "processes": accelerator.num_processes,
        **peak_memory(params[0].device),
    }
    if accelerator.is_main_process:
        (run_dir / runs.POSTERIOR).mkdir(exist_ok=True)
        with atomic_path(runs.posterior_file(run_dir, config.method)) as tmp:
            runs.write_safetensors(tmp, state)
        write_json(run_dir / runs.POSTERIOR / f"{config.method}.json", summary)
    accelerator.wait_for_everyone()
    return summary


def prior_by_validation_nll(blocks, linears, score_fn, val_qs: list[Question], batch_size: int, accelerator,
                            quiet: bool):
    """The PRIOR_GRID value with the lowest validation NLL of the probit predictive (Jacobians computed once per
    batch); returns (prior precision, {prior: nll}). Each process scores its strided share of the questions and
    the NLL sums are added over the processes, so all choose the same prior."""
    nll = torch.zeros(len(PRIOR_GRID), dtype=torch.float64)
    mine = val_qs[accelerator.process_index::accelerator.num_processes]
    bar = tqdm(range(0, len(mine), batch_size), desc="prior (val-nll)", leave=False,
               disable=quiet or not accelerator.is_main_process)
    for start in bar:
        batch = mine[start:start + batch_size]
        scores, jacobians = batch_logit_jacobians(score_fn, batch, linears)  # [B, C], [B, C, out, in]
        labels = torch.tensor([q.label for q in batch])
        for i, prior in enumerate(PRIOR_GRID):
            cov = logit_covariance(blocks, list(jacobians.values()), prior).cpu()  # [B, C, C]
            p = probit_probs(scores.cpu(), cov)[torch.arange(len(batch)), labels]  # [B]
            nll[i] -= p.double().clamp_min(PROB_FLOOR).log().sum()
    nll = accelerator.reduce(nll.to(accelerator.device), reduction="sum").cpu() / len(val_qs)
    best = int(nll.argmin())
    return PRIOR_GRID[best], {f"{p:g}": round(float(v), 6) for p, v in zip(PRIOR_GRID, nll)}


def validation_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean NLL of predictive probabilities [N, C] at labels [N], in float64."""
    picked = probs[torch.arange(len(labels)), labels].double().clamp_min(PROB_FLOOR)  # [N]
    return float(-picked.log().mean())


def fit_temperature_run(run_dir: Path, config: TrainConfig, quiet: bool) -> dict:
    """T by validation NLL of the base method's predictive draws -> posterior/temperature.json."""
    from ..evaluate import open_run
    from ..methods.temperature import FIT_FILE
    from ..predict import predict_probs
    from .temperature import apply_temperature, fit_temperature

    base = {**config.to_dict(), "method": config.base_method, "base_method": None}
    method, model, tokenizer, framing, accelerator = open_run(run_dir, base, config.base_method, {}, quiet=quiet)
    val_qs = validation_questions(config)
    reset_peak_memory(accelerator.device)
    start = time.perf_counter()
    predictive = predict_probs(method, model, tokenizer, framing, val_qs, accelerator=accelerator,
                               batch_size=config.batch_size, max_length=config.max_length,
                               n_samples=method.check_samples(None), quiet=quiet, desc="temperature",
                               keep_draws=True)
    labels = torch.tensor([q.label for q in val_qs])
    temperature = fit_temperature(predictive.draw_probs, labels)

    def nll(t: float) -> float:
        return validation_nll(apply_temperature(predictive.draw_probs, t).mean(0), labels)

    summary = {"temperature": temperature, "base_method": config.base_method, "validation_questions": len(val_qs),
               "draws": predictive.draws, "validation_nll_before": nll(1.0), "validation_nll_after": nll(temperature),
               "seconds": round(time.perf_counter() - start, 2), "processes": accelerator.num_processes,
               **peak_memory(accelerator.device)}
    if accelerator.is_main_process:  # every process has the gathered draws and the same T
        (run_dir / runs.POSTERIOR).mkdir(exist_ok=True)
        write_json(run_dir / runs.POSTERIOR / FIT_FILE, summary)
    accelerator.wait_for_everyone()
    return summary


def fit_swag_scale_run(run_dir: Path, config: TrainConfig, quiet: bool) -> dict:
    """The scale whose SWAG predictive (the method's default draws, the same draws' noise at every scale) has the
    lowest validation NLL among SCALE_GRID, extended by SCALE_STEP beyond an end while the best is that end ->
    posterior/swag-scale.json. Every process gets the gathered predictive, so all choose the same scale; the main
    one writes the file."""
    from ..evaluate import open_run
    from ..methods.swag import SCALE_FIT_FILE
    from ..predict import predict_probs

    swag = {**config.to_dict(), "method": "swag"}
    method, model, tokenizer, framing, accelerator = open_run(run_dir, swag, "swag", {}, quiet=quiet)  # draw seed 0
    val_qs = validation_questions(config)
    labels = torch.tensor([q.label for q in val_qs])
    draws = method.check_samples(None)
    reset_peak_memory(accelerator.device)
    start = time.perf_counter()
    nll: dict[float, float] = {}

    def try_scale(scale: float) -> None:
        method.scale = scale
        probs = predict_probs(method, model, tokenizer, framing, val_qs, accelerator=accelerator,
                              batch_size=config.batch_size, max_length=config.max_length, n_samples=draws,
                              quiet=quiet, desc=f"swag scale {scale:g}").probs  # [N, C]
        nll[scale] = validation_nll(probs, labels)

    for scale in SCALE_GRID:
        try_scale(scale)
    while True:
        best = min(nll, key=nll.__getitem__)
        if best == max(nll):
            beyond = best * SCALE_STEP
        elif best == min(nll):
            beyond = best / SCALE_STEP
        else:
            break
        if not SCALE_LIMITS[0] <= beyond <= SCALE_LIMITS[1]:
            break
        try_scale(beyond)
    summary = {"scale": best, "validation_nll": [[s, round(v, 6)] for s, v in sorted(nll.items())],
               "validation_questions": len(val_qs), "draws": draws, "seconds": round(time.perf_counter() - start, 2),
               "processes": accelerator.num_processes, **peak_memory(accelerator.device)}
    if accelerator.is_main_process:
        (run_dir / runs.POSTERIOR).mkdir(exist_ok=True)
        write_json(run_dir / runs.POSTERIOR / SCALE_FIT_FILE, summary)
    accelerator.wait_for_everyone()
    return summary
