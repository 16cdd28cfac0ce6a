"""`uqlora sft`: instruction tuning (LoRA or full fine-tuning) with a label-smoothed next-token loss.

The loop is train.py's, on token sequences instead of questions: accelerate, AdamW with linear warm-up and decay
(`lr_factor`), gradient clipping, each process taking a strided share of every micro-batch, the loss summed over
labelled tokens and divided by the step's global count of them (so micro-batching, gradient accumulation and the
number of processes leave the update unchanged), checkpoints with train.py's helpers (bit-exact --resume), and
nothing half-written on failure.

Outputs: RUN/config.yaml (the SftConfig + method), RUN/adapter/ (LoRA: a plain PEFT adapter) or RUN/model/
(full fine-tuning: save_pretrained model + tokenizer), RUN/train_log.jsonl, RUN/train_summary.json.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import runs
from ..errors import UqloraError
from ..io import write_json
from ..methods import get_method
from ..models import add_lora, load_model
from ..train import (Progress, _load_checkpoint, _save_checkpoint, _truncate_log, epoch_order, lr_factor,
                     optimizer_step, run_directory)
from .config import SftConfig, run_config
from .data import load_conversations
from .encode import Example, check_chat_template, collate, encode_all, n_targets, pack
from .loss import check_head, head_softcap, sft_loss

MODEL = "model"  # RUN/model/: the fully fine-tuned model and its tokenizer


def sft(config: SftConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False,
        step_hook: Callable[[int], None] | None = None) -> Path:
    """Fine-tune `config.model` on `config.data` into `run_dir` (or continue it with resume=True)."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    accelerator = Accelerator(cpu=config.device == "cpu")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UqloraError(f"run directory {run_dir} already exists; use --resume to continue it or another --out")
    conversations = load_conversations(config.data, config.max_examples)
    template = _read_template(config.chat_template)
    device = str(accelerator.device) if config.device == "auto" else config.device
    # AdamW on bf16 weights loses small updates: full fine-tuning keeps fp32 weights unless told otherwise
    dtype = "float32" if config.full_finetune and config.dtype == "auto" else config.dtype
    base, tokenizer = load_model(config.model, dtype=dtype, device=device, quiet=quiet)
    if template is not None:
        tokenizer.chat_template = template
    check_chat_template(tokenizer, config.model)
    examples, dropped = encode_all(tokenizer, conversations, config.max_length)
    if not examples:
        raise UqloraError(f"{config.data}: none of the {len(conversations)} examples keeps a response token "
                          f"within max_length={config.max_length}; raise --max-length")
    rows = pack(examples, config.max_length) if config.packing else examples

    with run_directory(run_dir, run_config(config, run_dir), resume, accelerator):
        _fit(config, run_dir, base, tokenizer, rows, (len(examples), dropped), accelerator, resume, quiet, step_hook)
    return run_dir


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UqloraError(f"chat template file not found: {path}")
    return Path(path).read_text(encoding="utf-8")


def _prepare(config: SftConfig, base):
    """The model to train: LoRA adapters (seeded) over the frozen base, or every weight trainable."""
    torch.manual_seed(config.seed)  # LoRA initialisation and dropout
    if config.full_finetune:
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    return add_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.lora_targets)


def _fit(config: SftConfig, run_dir: Path, base, tokenizer, rows: list[Example], counts, accelerator, resume,
         quiet, step_hook) -> None:
    model = _prepare(config, base)
    method = get_method(config.method)  # keeps no training state; the checkpoint helpers ask it
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    softcap = head_softcap(model, config.softcap)
    pad_id, device = tokenizer.pad_token_id, accelerator.device if config.device == "auto" else config.device
    check_head(model, collate(rows[:1], pad_id, config.packing, device), softcap)  # eval mode: no RNG drawn
    progress = Progress()
    if resume:
        progress, _, _ = _load_checkpoint(run_dir, model, optimizer, accelerator)
        if accelerator.is_main_process:
            _truncate_log(run_dir / runs.TRAIN_LOG, progress.global_step)

    per_step = config.batch_size * config.grad_accum  # rows per optimizer step, over all processes
    steps_per_epoch = math.ceil(len(rows) / per_step)
    total = config.max_steps or steps_per_epoch * config.epochs
    warmup = round(config.warmup_ratio * total)
    rank, world = accelerator.process_index, accelerator.num_processes
    log_path = run_dir / runs.TRAIN_LOG
    start, epoch_seconds = time.perf_counter(), []
    bar = tqdm(total=total, initial=progress.global_step, desc="sft", disable=quiet or not accelerator.is_main_process)
    model.train()
    while progress.global_step < total:
        epoch_start = time.perf_counter()
        order = epoch_order(len(rows), config.seed, progress.epoch)
        for step in range(progress.step_in_epoch, steps_per_epoch):
            step_idx = order[step * per_step:(step + 1) * per_step]
            step_tokens = sum(n_targets(rows[i]) for i in step_idx)  # labelled tokens of the step, all processes
            for g in optimizer.param_groups:
                g["lr"] = config.lr * lr_factor(progress.global_step, total, warmup)
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(0, len(step_idx), config.batch_size):
                local = step_idx[micro:micro + config.batch_size][rank::world]
                if not local:
                    continue
                batch = collate([rows[i] for i in local], pad_id, config.packing, device)
                loss = sft_loss(model, batch, label_smoothing=config.label_smoothing,
                                temperature=config.temperature, softcap=softcap, reduction="sum")
                (loss / step_tokens).backward()
                loss_sum += loss.detach().float().to(loss_sum.device)
            loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_tokens
            optimizer_step(loss, params, optimizer, config.max_grad_norm, accelerator, progress)
            progress.global_step += 1
            progress.step_in_epoch = step + 1
            if accelerator.is_main_process:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"step": progress.global_step, "epoch": progress.epoch + 1, "loss": loss,
                                          "lr": optimizer.param_groups[0]["lr"], "tokens": step_tokens}) + "\n")
            bar.update(1)
            bar.set_postfix(epoch=progress.epoch + 1, loss=f"{loss:.4f}")
            end_of_epoch = step + 1 == steps_per_epoch
            if end_of_epoch:
                progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
                epoch_seconds.append(time.perf_counter() - epoch_start)
            done = progress.global_step == total
            if not done and (end_of_epoch or (config.save_every and progress.global_step % config.save_every == 0)):
                _save_checkpoint(run_dir, model, optimizer, progress, None, method, accelerator)
            if step_hook is not None:
                step_hook(progress.global_step)
            if done:
                break
    bar.close()
    model.eval()
    _finish(config, run_dir, model, tokenizer, accelerator, {
        "steps": progress.global_step, "steps_per_epoch": steps_per_epoch,
        "epochs": progress.global_step / steps_per_epoch,
        "examples": counts[0], "dropped_examples": counts[1], "rows": len(rows), "packing": config.packing,
        "target_tokens_per_epoch": sum(n_targets(r) for r in rows),
        "row_tokens_per_epoch": sum(len(r.ids) for r in rows), "softcap": softcap,
        "epoch_seconds": epoch_seconds, "seconds": round(time.perf_counter() - start, 2),
        "processes": accelerator.num_processes})


def _finish(config: SftConfig, run_dir: Path, model, tokenizer, accelerator, summary: dict) -> None:
    """Write the adapter (LoRA) or the model and tokenizer (full fine-tuning), the summary; drop the checkpoint."""
    if accelerator.is_main_process:
        name = MODEL if config.full_finetune else runs.ADAPTER
        tmp = run_dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        if config.full_finetune:
            tokenizer.save_pretrained(tmp)
        runs.replace_dir(tmp, run_dir / name)
        write_json(run_dir / runs.SUMMARY, summary)
        shutil.rmtree(run_dir / runs.CHECKPOINT, ignore_errors=True)
    accelerator.wait_for_everyone()
