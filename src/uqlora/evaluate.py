"""Evaluation: a run's (or the base model's) predictive on a task -> metrics.json, predictions.jsonl,
reliability.png under RUN/eval/TASK/ (PROTOCOL.md "Predictive and metrics")."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import runs
from .config import DEFAULT_MAX_LENGTH, dump_yaml
from .data import load_questions
from .errors import UqloraError
from .evaluation.metrics import classification_metrics
from .evaluation.reliability import plot_reliability
from .io import write_json, write_jsonl, write_text
from .methods import get_method
from .models import default_framing, load_adapter, load_model
from .predict import predict_probs


@dataclass
class EvalOptions:
    task: str
    split: str = "test"
    max_examples: int | None = None
    n_bins: int = 15
    samples: int = 1
    batch_size: int = 8
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
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    if opts.n_bins < 1 or opts.samples < 1 or opts.batch_size < 1:
        raise UqloraError("--n-bins, --samples and --batch-size must be >= 1")
    method = get_method(config["method"])
    questions = load_questions(opts.task, opts.split, data_dir=opts.data_dir or config.get("data_dir"),
                               source=opts.source or config.get("source") or "auto",
                               max_examples=opts.max_examples)
    device = opts.device or config.get("device", "auto")
    accelerator = Accelerator(cpu=device == "cpu")
    model, tokenizer = load_model(config["model"], dtype=opts.dtype or config.get("dtype", "auto"),
                                  device=str(accelerator.device) if device == "auto" else device, quiet=opts.quiet)
    if method.trains:
        model = load_adapter(method.prepare(model), run_dir / runs.ADAPTER)
        posterior = run_dir / runs.POSTERIOR / f"{method.name}.safetensors"
        if posterior.exists():
            method.load_state_dict(runs.read_safetensors(posterior))
    framing = config.get("framing", "auto")
    framing = default_framing(config["model"], model) if framing == "auto" else framing

    start = time.perf_counter()
    probs, draws = predict_probs(method, model, tokenizer, framing, questions, accelerator=accelerator,
                                 batch_size=opts.batch_size, max_length=int(config.get("max_length", DEFAULT_MAX_LENGTH)),
                                 n_samples=opts.samples, quiet=opts.quiet, desc=f"evaluate {opts.task}")
    seconds = time.perf_counter() - start
    labels = torch.tensor([q.label for q in questions])
    metrics = classification_metrics(probs, labels, n_bins=opts.n_bins)
    metrics.update(n_samples=draws, task=opts.task, split=opts.split, framing=framing, seconds=round(seconds, 2))
    if accelerator.is_main_process:
        out = runs.eval_dir(run_dir, opts.task, opts.split)
        write_jsonl(out / "predictions.jsonl", (
            {"id": q.id, "label": q.label, "probs": probs[i, : len(q.choices)].tolist()}
            for i, q in enumerate(questions)))
        plot_reliability(probs, labels, opts.n_bins, out / "reliability.png",
                         title=f"{run_dir.name}: {opts.task} {opts.split} ({config['method']})")
        write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics
