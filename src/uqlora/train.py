"""Training: LoRA fine-tuning on multiple-choice questions through accelerate, resumable.

The loss is the method's per-question loss (MAP: cross-entropy over the C class scores) averaged over the
questions of one optimizer step. Processes each take a strided share of every micro-batch and scale their
loss by the step's global question count; gradients are then summed over processes, so one process and N
processes compute the same update. AdamW, linear warm-up then linear decay, gradient clipping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import runs
from .config import TrainConfig, dump_yaml
from .data import load_questions
from .errors import UqloraError
from .evaluation.metrics import classification_metrics
from .framing import class_scores
from .io import write_json, write_text
from .memory import peak_memory, reset_peak_memory
from .methods import get_method
from .methods.map import MapMethod
from .models import add_lora, default_framing, load_model
from .predict import predict_probs
from .schedule import lr_factor

# The held-out slice is drawn with this fixed seed, so every training seed selects epochs on the same questions.
HELD_OUT_SEED = 0


@dataclass
class Progress:
    """Where training is: enough, with the checkpoint's tensors, to resume bit for bit."""

    global_step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    best_epoch: int = -1
    best_val_nll: float = math.inf
    epoch_seconds: list = field(default_factory=list)  # wall seconds of each finished epoch, resumes included
    seconds_in_epoch: float = 0.0  # wall seconds already spent in the epoch in progress (a mid-epoch checkpoint)


def split_held_out(questions: list, fraction: float) -> tuple[list, list]:
    if fraction <= 0:
        return questions, []
    n_val = max(1, round(len(questions) * fraction))
    if n_val >= len(questions):
        raise UqloraError(f"val_fraction {fraction} leaves no training questions out of {len(questions)}")
    held = set(random.Random(HELD_OUT_SEED).sample(range(len(questions)), n_val))
    return ([q for i, q in enumerate(questions) if i not in held], [q for i, q in enumerate(questions) if i in held])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)  # distinct stream per (seed, epoch)
    return torch.randperm(n, generator=generator).tolist()


def _save_checkpoint(run_dir: Path, model, optimizer, progress: Progress, best_state, method, accelerator) -> None:
    tmp = run_dir / (runs.CHECKPOINT + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        runs.write_safetensors(tmp / "trainable.safetensors", runs.trainable_state(model))
        runs.write_safetensors(tmp / "optimizer.safetensors", runs.optimizer_tensors(optimizer))
        if best_state is not None:
            runs.write_safetensors(tmp / "best.safetensors", best_state)
        method_state = method.training_state()
        if method_state:
            runs.write_safetensors(tmp / "method.safetensors", method_state)
        (tmp / "progress.json").write_text(json.dumps(vars(progress)))
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    runs.write_safetensors(tmp / f"rng{accelerator.process_index}.safetensors", rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.replace_dir(tmp, run_dir / runs.CHECKPOINT)
    accelerator.wait_for_everyone()


def _load_checkpoint(run_dir: Path, model, optimizer, accelerator):
    ckpt = run_dir / runs.CHECKPOINT
    if not ckpt.is_dir():
        raise UqloraError(f"nothing to resume in {run_dir}: no {runs.CHECKPOINT}/ folder")
    runs.load_trainable_state(model, runs.read_safetensors(ckpt / "trainable.safetensors"), f"checkpoint {ckpt}")
    runs.load_optimizer_tensors(optimizer, runs.read_safetensors(ckpt / "optimizer.safetensors"))
    fields = runs.read_json(ckpt / "progress.json")
    try:
        progress = Progress(**fields)
    except TypeError:
        raise UqloraError(f"corrupt checkpoint file {ckpt / 'progress.json'}: unexpected fields") from None
    best = runs.read_safetensors(ckpt / "best.safetensors") if (ckpt / "best.safetensors").exists() else None
    method_state = runs.read_safetensors(ckpt / "method.safetensors") if (ckpt / "method.safetensors").exists() else {}
    rng = runs.read_safetensors(ckpt / f"rng{accelerator.process_index}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return progress, best, method_state


def _truncate_log(path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= global_step]
    write_text(path, "".join(ln + "\n" for ln in kept))


def _all_reduce_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="sum")


def optimizer_step(loss: float, params: list[torch.nn.Parameter], optimizer, max_grad_norm: float, accelerator,
                   progress: Progress) -> None:
    """Refuse a non-finite step loss, sum the gradients over processes, clip them, step (train and sft)."""
    if not math.isfinite(loss):
        raise UqloraError(f"non-finite training loss ({loss}) at step {progress.global_step + 1}, epoch "
                          f"{progress.epoch + 1}; lower --lr or check the data")
    _all_reduce_grads(params, accelerator)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def sgd_step(params: list[torch.nn.Parameter], lr: float, factor: float, accelerator) -> None:
    """p -= lr · factor · (gradient summed over processes), unclipped, for a method's own SGD parameters."""
    if not params:
        return
    _all_reduce_grads(params, accelerator)
    for p in params:
        if p.grad is not None:
            p.sub_(p.grad, alpha=lr * factor)
            p.grad = None


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False,
          step_hook: Callable[[int], None] | None = None) -> Path:
    """Train `config` into `run_dir` (or continue it with resume=True); returns the run directory.

    An ensemble method trains its members one after another on the same frozen base model, each as a complete
    run of the member method in RUN/members/<m>/ with seed `seed + m`; --resume skips finished members.
    """
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    accelerator = Accelerator(cpu=config.device == "cpu")
    reset_peak_memory(accelerator.device)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UqloraError(f"run directory {run_dir} already exists; use --resume to continue it or another --out")
    method = get_method(config.method, config)
    if method.trained_by != "train":
        raise UqloraError(f"method {config.method!r} runs are made by `uqlora {method.trained_by}`, not `uqlora train`")
    if not method.trains:
        raise UqloraError(f"method {config.method!r} is not trained; use `uqlora evaluate`")

    questions = load_questions(config.task, config.split, data_dir=config.data_dir, source=config.source,
                               max_examples=config.max_examples)
    train_qs, val_qs = split_held_out(questions, config.val_fraction)
    device = str(accelerator.device) if config.device == "auto" else config.device
    base, tokenizer = load_model(config.model, dtype=config.dtype, device=device, quiet=quiet)
    framing = default_framing(config.model, base) if config.framing == "auto" else config.framing
    data = (tokenizer, framing, train_qs, val_qs)

    with run_directory(run_dir, {**config.to_dict(), "framing": framing}, resume, accelerator):
        if method.member_method is None:
            trained = resume and method.posthoc and (run_dir / runs.SUMMARY).is_file()  # its fit was interrupted
            model = None if trained else _train_one(config, run_dir, base, data, accelerator, resume, quiet,
                                                    step_hook)
            if method.posthoc:
                from .posthoc.fit import fit_run

                fit_run(run_dir, config, model=model, tokenizer=tokenizer, framing=framing, accelerator=accelerator,
                        quiet=quiet)
        else:
            _train_members(config, run_dir, method.member_method, base, data, accelerator, quiet, step_hook)
    return run_dir


@contextlib.contextmanager
def run_directory(run_dir: Path, config: dict, resume: bool, accelerator):
    """Create `run_dir` with its config.yaml (kept as it is when resuming) for the training inside the block;
    on a UqloraError remove what a fresh run wrote, so --out is left as it was (train and sft)."""
    existed = run_dir.exists()  # then empty (the callers check) unless resuming
    try:
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_text(run_dir / runs.CONFIG, dump_yaml(config))
        accelerator.wait_for_everyone()
        yield
    except UqloraError:
        if not resume and accelerator.is_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)
            if existed:
                run_dir.mkdir()
        raise


def _train_members(config, run_dir, member_method, base, data, accelerator, quiet, step_hook) -> None:
    """Members m = 0..M-1 in turn: finished ones (adapter saved) are kept, a checkpointed one is resumed."""
    summaries = []
    for m in range(config.members):
        member_config = dataclasses.replace(config, method=member_method, seed=config.seed + m, members=1)
        member = runs.member_dir(run_dir, m)
        finished = (member / runs.SUMMARY).is_file()
        if not finished:
            resumable = (member / runs.CHECKPOINT).is_dir()
            if not resumable and accelerator.is_main_process:
                shutil.rmtree(member, ignore_errors=True)
                write_text(member / runs.CONFIG, dump_yaml({**member_config.to_dict(), "framing": data[1]}))
            accelerator.wait_for_everyone()
            if not quiet and accelerator.is_main_process:
                print(f"member {m + 1}/{config.members}: {member_method}, seed {member_config.seed}")
            model = _train_one(member_config, member, base, data, accelerator, resumable, quiet, step_hook)
            base = model.unload()  # the frozen base model without this member's LoRA layers, for the next
        summaries.append(runs.read_json(member / runs.SUMMARY))
    if accelerator.is_main_process:
        write_json(run_dir / runs.SUMMARY, {
            "members": config.members, "member_method": member_method,
            "steps": sum(s["steps"] for s in summaries),
            "epoch_seconds": [t for s in summaries for t in s["epoch_seconds"]],
            **peak_memory(accelerator.device)})
    accelerator.wait_for_everyone()


def _train_one(config, run_dir, base, data, accelerator, resume, quiet, step_hook):
    """Add fresh LoRA layers (seeded) to `base`, train them into `run_dir`; returns the PEFT model."""
    tokenizer, framing, train_qs, val_qs = data
    method = get_method(config.method, config)
    torch.manual_seed(config.seed)  # LoRA initialisation and dropout
    model = method.prepare(add_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                    target_modules=config.lora_targets))
    if accelerator.process_index > 0:  # the same initialisation everywhere, but each process its own dropout/noise
        torch.manual_seed(int(np.random.SeedSequence([config.seed, accelerator.process_index]).generate_state(1)[0]))
    own = {id(p) for p in method.sgd_parameters()[0]}  # stepped by plain SGD in _fit, not by AdamW
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    progress, best_state, method_state = Progress(), None, {}
    if resume:
        progress, best_state, method_state = _load_checkpoint(run_dir, model, optimizer, accelerator)
        if accelerator.is_main_process:
            _truncate_log(run_dir / runs.TRAIN_LOG, progress.global_step)
    _fit(config, run_dir, model, tokenizer, framing, method, optimizer, params, train_qs, val_qs,
         progress, best_state, method_state, accelerator, quiet, step_hook)
    return model


def _fit(config, run_dir, model, tokenizer, framing, method, optimizer, params, train_qs, val_qs,
         progress: Progress, best_state, method_state, accelerator, quiet, step_hook) -> None:
    per_step = config.batch_size * config.grad_accum  # questions per optimizer step, over all processes
    steps_per_epoch = math.ceil(len(train_qs) / per_step)
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_ratio * total)
    log_path = run_dir / runs.TRAIN_LOG
    rank, world = accelerator.process_index, accelerator.num_processes
    method.on_train_start(model, total, steps_per_epoch)
    sgd_params, sgd_lr = method.sgd_parameters()  # the method's own SGD step after each AdamW step (none: no-op)
    if method_state:
        method.load_training_state(method_state)

    bar = tqdm(total=total, initial=progress.global_step, desc="train", disable=quiet or not accelerator.is_main_process)
    model.train()
    while progress.epoch < config.epochs:
        epoch_start = time.perf_counter() - progress.seconds_in_epoch  # a resumed epoch counts its earlier part
        order = epoch_order(len(train_qs), config.seed, progress.epoch)
        for step in range(progress.step_in_epoch, steps_per_epoch):
            step_idx = order[step * per_step:(step + 1) * per_step]
            for g in optimizer.param_groups:
                g["lr"] = method.learning_rate(progress.global_step,
                                               config.lr * lr_factor(progress.global_step, total, warmup))
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(0, len(step_idx), config.batch_size):
                local = step_idx[micro:micro + config.batch_size][rank::world]
                if not local:
                    continue
                qs = [train_qs[i] for i in local]
                with method.scoring(qs):
                    scores = class_scores(framing, model, tokenizer, qs, config.max_length)  # [b, C]
                labels = torch.tensor([q.label for q in qs], device=scores.device)
                losses = method.loss(scores, labels)  # [b]
                (losses.sum() / len(step_idx)).backward()
                loss_sum += losses.detach().sum().to(loss_sum.device)
            loss = accelerator.reduce(loss_sum, reduction="sum").item() / len(step_idx)
            optimizer_step(loss, params, optimizer, config.max_grad_norm, accelerator, progress)
            sgd_step(sgd_params, sgd_lr, lr_factor(progress.global_step, total, warmup), accelerator)
            progress.global_step += 1
            progress.step_in_epoch = step + 1
            method.on_step_end(model, progress.global_step)
            if accelerator.is_main_process:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"step": progress.global_step, "epoch": progress.epoch + 1,
                                                        "loss": loss, "lr": optimizer.param_groups[0]["lr"]}) + "\n")
            bar.update(1)
            bar.set_postfix(epoch=progress.epoch + 1, loss=f"{loss:.4f}")
            end_of_epoch = step + 1 == steps_per_epoch
            if end_of_epoch:
                best_state = _end_epoch(config, run_dir, model, tokenizer, framing, method, val_qs, progress,
                                        best_state, accelerator, quiet)
                progress.epoch_seconds.append(time.perf_counter() - epoch_start)
            if end_of_epoch or (config.save_every and progress.global_step % config.save_every == 0):
                progress.seconds_in_epoch = 0.0 if end_of_epoch else time.perf_counter() - epoch_start
                _save_checkpoint(run_dir, model, optimizer, progress, best_state, method, accelerator)
            if step_hook is not None:
                step_hook(progress.global_step)
    bar.close()
    _finish(config, run_dir, model, method, progress, best_state, accelerator, progress.epoch_seconds,
            steps_per_epoch, len(train_qs), len(val_qs))


def _end_epoch(config, run_dir, model, tokenizer, framing, method, val_qs, progress, best_state, accelerator, quiet):
    """Score the held-out slice (if any), remember the best epoch, and move the progress to the next epoch."""
    finished = progress.epoch
    progress.epoch += 1
    progress.step_in_epoch = 0
    if not val_qs:
        return best_state
    # the held-out slice judges the current weights: the point predictive, whatever the method samples later
    probs = predict_probs(MapMethod(), model, tokenizer, framing, val_qs, accelerator=accelerator,
                          batch_size=config.batch_size, max_length=config.max_length, quiet=quiet,
                          desc="held-out").probs
    metrics = classification_metrics(probs, torch.tensor([q.label for q in val_qs]))
    if accelerator.is_main_process:
        with open(run_dir / runs.TRAIN_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": progress.global_step, "epoch": finished + 1,
                                                "val_nll": metrics["nll"], "val_accuracy": metrics["accuracy"],
                                     "val_ece": metrics["ece"], "val_brier": metrics["brier"]}) + "\n")
    if metrics["nll"] < progress.best_val_nll:
        progress.best_val_nll, progress.best_epoch = metrics["nll"], finished + 1
        best_state = runs.trainable_state(model)
    return best_state


def _finish(config, run_dir, model, method, progress, best_state, accelerator, epoch_seconds, steps_per_epoch,
            n_train, n_val) -> None:
    """Write the final adapter (the best epoch's, when a held-out slice chose one) and drop the checkpoint."""
    if best_state is not None:
        runs.load_trainable_state(model, best_state, "best-epoch state")
    method.on_train_end(model)
    if accelerator.is_main_process:
        tmp = run_dir / (runs.ADAPTER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        runs.replace_dir(tmp, run_dir / runs.ADAPTER)
        state = method.state_dict()
        if state:
            (run_dir / runs.POSTERIOR).mkdir(exist_ok=True)
            runs.write_safetensors(runs.posterior_file(run_dir, method.posterior_name), state)
        write_json(run_dir / runs.SUMMARY, {
            "steps": progress.global_step, "epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
            "train_questions": n_train, "held_out_questions": n_val,
            "best_epoch": progress.best_epoch if n_val else config.epochs,
            "epoch_seconds": epoch_seconds, "processes": accelerator.num_processes,
            **peak_memory(accelerator.device),
        })
        shutil.rmtree(run_dir / runs.CHECKPOINT, ignore_errors=True)
    accelerator.wait_for_everyone()
