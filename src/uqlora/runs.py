"""The run directory (DESIGN.md): the contract between train, evaluate and compare.

    RUN/config.yaml                   resolved configuration (everything needed to reproduce)
    RUN/adapter/                      plain PEFT adapter (absent for a zero-shot run)
    RUN/posterior/                    method state, safetensors + JSON
    RUN/train_log.jsonl               one line per optimizer step: step, epoch, loss, lr (+ held-out lines)
    RUN/train_summary.json            steps, epochs, best epoch, wall times
    RUN/checkpoint/                   only while training: what --resume needs (removed when training ends)
    RUN/members/<m>/                  ensembles (ensemble, multiswag): member m, itself a complete run directory
                                      of the member method with seed + m; the ensemble has no adapter/ of its own
    RUN/eval/TASK/metrics.json, predictions.jsonl, reliability.png   (TASK-SPLIT for splits other than test;
                                      TASK@METHOD for `evaluate --method`, another predictive of the same run)

Checkpoints hold tensors in safetensors and the rest in JSON: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UqloraError

CONFIG = "config.yaml"
ADAPTER = "adapter"
POSTERIOR = "posterior"
CHECKPOINT = "checkpoint"
TRAIN_LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
MEMBERS = "members"


def member_dir(run_dir: Path, member: int) -> Path:
    return Path(run_dir) / MEMBERS / str(member)


def posterior_file(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / POSTERIOR / f"{method}.safetensors"


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise UqloraError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise UqloraError(f"{run_dir} is not a uqlora run directory: {CONFIG} is missing")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UqloraError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "model" not in data or "method" not in data:
        raise UqloraError(f"{path} must be a mapping with at least 'model' and 'method'")
    return data


def eval_dir(run_dir: Path, task: str, split: str, method: str | None = None) -> Path:
    """eval/TASK for the test split, eval/TASK-SPLIT otherwise; ':' and '/' become '-'. An evaluation with
    another predictive than the run's own method (`evaluate --method`) goes to eval/TASK@METHOD."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", task if not task.startswith("jsonl:") else "jsonl-" + Path(task[6:]).stem)
    name = name if split == "test" else f"{name}-{split}"
    return Path(run_dir) / "eval" / (name if method is None else f"{name}@{method}")


def copy_entries(source: Path, dest: Path, names) -> None:
    """Copy the files and folders `names` of run directory `source` that exist into `dest` (posthoc, combine)."""
    for name in names:
        path = Path(source) / name
        if path.is_dir():
            shutil.copytree(path, Path(dest) / name)
        elif path.is_file():
            shutil.copy2(path, Path(dest) / name)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a fully written folder in place of `final` (the old one is removed only after the swap)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by name, detached CPU copies."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise UqloraError(f"{where} does not match the model's trainable parameters "
                          f"(e.g. {sorted(set(params) ^ set(state))[:2]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise UqloraError(f"{where}: {n} has shape {tuple(state[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(state[n])


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments as flat tensors: '<i>.<key>' for the i-th parameter."""
    out = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{i}.{key}"] = torch.as_tensor(value).detach().to("cpu", copy=True).contiguous()
    return out


def load_optimizer_tensors(optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        if int(index) >= len(params):
            raise UqloraError(f"checkpoint optimizer state names parameter {index}; the model has {len(params)}")
        p = params[int(index)]
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value.clone()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UqloraError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UqloraError(f"corrupt checkpoint file {path}: {err}") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UqloraError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UqloraError(f"corrupt checkpoint file {path}: {err}") from None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
