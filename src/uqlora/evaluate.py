"""Evaluation: a run's (or the base model's) predictive on a task -> metrics.json, predictions.jsonl,
reliability.png under RUN/eval/TASK/ (PROTOCOL.md "Predictive and metrics")."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import runs
from .config import DEFAULT_MAX_LENGTH, dump_yaml, from_mapping
from .data import load_questions
from .errors import UqloraError
from .evaluation.metrics import classification_metrics, predictive_entropy
from .evaluation.reliability import plot_reliability
from .io import write_json, write_jsonl, write_text
from .memory import peak_memory, reset_peak_memory
from .methods import Adapter, Method, get_method
from .models import default_framing, load_adapter, load_model
from .posthoc.logit_store import FILE as LOGIT_FILE
from .posthoc.logit_store import LogitStore, open_store
from .predict import predict_probs


@dataclass
class EvalOptions:
    task: str
    split: str = "test"
    max_examples: int | None = None
    n_bins: int = 15
    samples: int | None = None  # posterior draws (per member); default: the method's
    seed: int = 0  # seed of the posterior draws
    swag_scale: float | None = None  # default: the run's
    method: str | None = None  # another predictive of the same training (ALTERNATIVE_PREDICTIVES)
    link: str | None = None  # laplace: probit or mc; default: the run's
    batch_size: int = 8
    sample_batch: int = 0  # posterior draws per forward: 0 = auto (CUDA as many as fit, CPU 1; methods/batched.py)
    data_dir: str | None = None  # default: the run's
    source: str | None = None  # default: the run's, else auto
    dtype: str | None = None  # default: the run's, else auto
    device: str | None = None
    quiet: bool = False


def init_zero_shot_run(out: Path, model: str, framing: str = "auto", max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """A run directory for the base model without an adapter (method zero-shot)."""
    out = Path(out)
    if (out / runs.CONFIG).exists():
        existing = runs.read_config(out)
        if existing.get("method") != "zero-shot" or existing.get("model") != model:
            raise UqloraError(f"{out} already holds a {existing.get('method')} run of {existing.get('model')!r}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / runs.CONFIG, dump_yaml({"model": model, "method": "zero-shot", "framing": framing,
                                             "max_length": max_length}))
    return out


def evaluate(run_dir: Path, opts: EvalOptions) -> dict:
    """Evaluate a run directory on one task and split; returns the metrics (also written to disk)."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    config = get_method(config["method"]).run_settings(config, run_dir)  # an sft run's config is an SftConfig
    if (opts.n_bins < 1 or (opts.samples is not None and opts.samples < 0) or opts.batch_size < 1
            or opts.sample_batch < 0):
        raise UqloraError("--n-bins and --batch-size must be >= 1, --samples >= 0 (0: blob/clora posterior mean), "
                          "--sample-batch >= 0 (0: automatic)")
    overrides = {k: v for k, v in (("swag_scale", opts.swag_scale), ("link", opts.link)) if v is not None}
    method_name = _predictive(config["method"], opts.method)
    run = open_run(run_dir, config, method_name, overrides, seed=opts.seed, device=opts.device, dtype=opts.dtype,
                   quiet=opts.quiet)
    method, model, tokenizer, framing, accelerator = run
    n_samples = method.check_samples(opts.samples)
    questions = load_questions(opts.task, opts.split, data_dir=opts.data_dir or config.get("data_dir"),
                               source=opts.source or config.get("source") or "auto",
                               max_examples=opts.max_examples)

    out = result_dir(run_dir, config, opts)
    store = _logit_store(method, run_dir, opts, model)
    reset_peak_memory(accelerator.device)
    start = time.perf_counter()
    probs, draws, mutual_info, _ = predict_probs(
        method, model, tokenizer, framing, questions, accelerator=accelerator, batch_size=opts.batch_size,
        max_length=int(config.get("max_length", DEFAULT_MAX_LENGTH)), n_samples=n_samples, quiet=opts.quiet,
        desc=f"evaluate {opts.task}", sample_batch=opts.sample_batch)
    seconds = time.perf_counter() - start
    labels = torch.tensor([q.label for q in questions])
    metrics = classification_metrics(probs, labels, n_bins=opts.n_bins)
    entropy = predictive_entropy(probs)  # [N]
    metrics.update(method=method_name, n_samples=draws, mean_entropy=float(entropy.mean()),
                   mean_mutual_information=float(mutual_info.mean()), task=opts.task, split=opts.split,
                   framing=framing, seconds=round(seconds, 2), **peak_memory(accelerator.device))
    if store is not None:
        reused, reused_seconds, made = _gathered(store, questions, accelerator)
        metrics.update(reused_logit_gaussians=reused, reused_logit_gaussian_seconds=round(reused_seconds, 2))
    if accelerator.is_main_process:
        if store is not None:
            store.write(out / LOGIT_FILE, made, seconds + reused_seconds)
        write_jsonl(out / "predictions.jsonl", (
            {"id": q.id, "label": q.label, "probs": probs[i, : len(q.choices)].tolist(),
             "entropy": float(entropy[i]), **({"mutual_information": float(mutual_info[i])} if draws > 1 else {})}
            for i, q in enumerate(questions)))
        plot_reliability(probs, labels, opts.n_bins, out / "reliability.png",
                         title=f"{run_dir.name}: {opts.task} {opts.split} ({method_name})")
        write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


def _logit_store(method: Method, run_dir: Path, opts: EvalOptions, model) -> LogitStore | None:
    """A predictive's logit Gaussians (Laplace's): read back from this task's evaluation with another predictive of
    the same posterior if one was made, and kept for the next (posthoc/logit_store.py); None for other methods."""
    sources = method.logit_store_sources()
    if not sources:
        return None
    candidates = [runs.eval_dir(run_dir, opts.task, opts.split, alternative) / LOGIT_FILE for alternative in sources]
    dtype = next(model.parameters()).dtype
    method.logits = open_store(runs.posterior_file(run_dir, method.posterior_name), dtype, candidates)
    return method.logits


def _gathered(store: LogitStore, questions, accelerator) -> tuple[int, float, list]:
    """Over all processes: the number of questions whose Gaussians were read back, what computing those had cost,
    and every Gaussian in question order."""
    reused, seconds, made = store.reused, store.reused_seconds, list(store.made.items())
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        reused, seconds, made = sum(gather_object([reused])), sum(gather_object([seconds])), gather_object(made)
    order = {q.id: i for i, q in enumerate(questions)}
    return reused, seconds, sorted(made, key=lambda item: order[item[0]])


def result_dir(run_dir: Path, config: dict, opts: EvalOptions) -> Path:
    """eval/TASK for the run's own predictive; eval/TASK@METHOD for `--method`, eval/TASK@METHOD-LINK for a
    `--link` other than the run's, eval/TASK@METHOD-mean for `--samples 0` (compare shows these as methods)."""
    method = _predictive(config["method"], opts.method)
    alternative = None if method == config["method"] else method
    if opts.link is not None and opts.link != config.get("link", "probit"):
        alternative = f"{method}-{opts.link}"
    if opts.samples == 0:
        alternative = f"{method}-mean"
    return runs.eval_dir(run_dir, opts.task, opts.split, alternative)


class OpenRun(NamedTuple):
    method: Method  # bound to the model with the run's adapter(s) and posterior
    model: object
    tokenizer: object
    framing: str
    accelerator: object


def open_run(run_dir: Path, config: dict, method_name: str, overrides: dict, *, seed: int = 0,
             device: str | None = None, dtype: str | None = None, quiet: bool = False) -> OpenRun:
    """Load a run's model and adapter(s) and bind the predictive `method_name` (the run's method, or one of its
    ALTERNATIVE_PREDICTIVES); `overrides` replace config values (swag_scale, link); `seed` fixes the draws."""
    from accelerate import Accelerator

    trained = get_method(config["method"], _config(config, {}, run_dir))
    method = get_method(method_name, _config(config, {**overrides, "method": method_name}, run_dir))
    method.load_fitted(run_dir)
    device = device or config.get("device", "auto")
    accelerator = Accelerator(cpu=device == "cpu")
    model, tokenizer = load_model(config["model"], dtype=dtype or config.get("dtype", "auto"),
                                  device=str(accelerator.device) if device == "auto" else device, quiet=quiet)
    model, adapters = _load_adapters(trained, model, run_dir, config)
    torch.manual_seed(seed)  # anything left on the global generator (the predictive draws use draw_generator)
    method.bind(model, adapters, seed=seed)
    framing = config.get("framing", "auto")
    framing = default_framing(config["model"], model) if framing == "auto" else framing
    return OpenRun(method, model, tokenizer, framing, accelerator)


def _config(config: dict, overrides: dict, run_dir: Path):
    """The run's settings as a TrainConfig, with `overrides`; --link only where a Laplace predictive reads it."""
    if "link" in overrides and not {config["method"], config.get("base_method")} & {"laplace", "laplace-ll"}:
        raise UqloraError(f"--link applies to laplace and laplace-ll runs, not to a {config['method']} run")
    if "swag_scale" in overrides and config["method"] == "swag-scale":
        raise UqloraError(f"--swag-scale: the scale of {run_dir} was fitted (posterior/swag-scale.json); evaluate "
                          "the swag run it was fitted on for another scale")
    return from_mapping({**config, **overrides}, f"{run_dir / runs.CONFIG}")


# Predictives that need no other training than the run's own: MC dropout of a (dropout-trained) MAP adapter,
# and SWA from a SWAG run (its adapter is the SWA mean).
ALTERNATIVE_PREDICTIVES = {"map": ("mc-dropout",), "mc-dropout": ("map",), "swag": ("swa",)}


def _predictive(trained: str, requested: str | None) -> str:
    if requested is None or requested == trained:
        return trained
    if requested not in ALTERNATIVE_PREDICTIVES.get(trained, ()):
        allowed = ", ".join(ALTERNATIVE_PREDICTIVES.get(trained, ())) or "none"
        raise UqloraError(f"--method {requested}: a {trained} run's training does not give that predictive "
                          f"(possible: {allowed}); train with --method {requested}")
    return requested


def _load_adapters(method, model, run_dir: Path, config: dict):
    """The run's adapter(s) on the one base model, with each one's posterior state (none for zero-shot).

    An ensemble's members are adapters `member0`, `member1`, ... read from RUN/members/<m>/.
    """
    if not method.trains:
        return model, []
    if method.member_method is None:
        sources = [("default", run_dir, method.posterior_name)]
    else:
        n = int(config.get("members", 0))
        sources = [(f"member{m}", runs.member_dir(run_dir, m), method.member_method) for m in range(n)]
        missing = [str(d) for _, d, _ in sources if not (d / runs.ADAPTER).is_dir()]
        if n < 1 or missing:
            raise UqloraError(f"{run_dir}: ensemble of {n} members is incomplete (missing {missing[:2]}); "
                              f"finish it with `uqlora train --out {run_dir} --resume`")
    model = method.prepare(model)
    adapters = []
    for name, source, member_method in sources:
        model = load_adapter(model, source / runs.ADAPTER, adapter_name=name)
        posterior = runs.posterior_file(source, member_method)
        adapters.append(Adapter(name, runs.read_safetensors(posterior) if posterior.exists() else {}))
    return model, adapters
