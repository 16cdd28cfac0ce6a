"""`uqlora sft` configuration: one dataclass is the YAML file, the CLI flags and the run's config.yaml
(with the helpers of uqlora.config: defaults < `--config FILE.yaml` < flags)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import _opt, from_mapping
from ..errors import UqloraError

# Methods written in config.yaml: LoRA runs (an adapter over `model`) and full fine-tuning (the run's own model/).
LORA_METHOD, FULL_METHOD = "sft", "sft-full"


@dataclass
class SftConfig:
    model: str = _opt("smollm2-135m", "alias (smollm2-135m, gemma3-270m), .gguf file, model folder or hub id")
    data: typing.Optional[str] = _opt(None, "instruction data (required): JSON array or JSONL, .gz allowed, of "
                                            "instruction/input/output/history rows or chat `messages` rows")
    max_examples: typing.Optional[int] = _opt(None, "train on this many examples, drawn with a fixed seed")
    epochs: int = _opt(1, "passes over the examples (ignored when max_steps is set)")
    max_steps: int = _opt(0, "optimizer steps to train (0: `epochs` epochs); the lr schedule spans them")
    lr: float = _opt(2e-4, "peak AdamW learning rate (LoRA; use ~1e-5 for full fine-tuning)")
    batch_size: int = _opt(4, "sequences per micro-batch (packed rows with --packing), over all processes")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    seed: int = _opt(0, "seed of LoRA initialisation, data order and dropout")
    warmup_ratio: float = _opt(0.1, "fraction of the optimizer steps with linear learning-rate warm-up")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping threshold (L2 norm); 0 disables clipping")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_targets: typing.List[str] = _opt(["q_proj", "v_proj"], "module names that get LoRA adapters")
    full_finetune: bool = _opt(False, "train every weight instead of LoRA adapters; the run saves RUN/model/")
    label_smoothing: float = _opt(0.0, "label smoothing eps of the next-token cross-entropy, in [0, 1)")
    softcap: typing.Optional[float] = _opt(None, "logit softcap c: z -> c tanh(z / c); None: the model's own "
                                                 "final_logit_softcapping, if it has one")
    temperature: float = _opt(1.0, "the training logits are z / T")
    max_length: int = _opt(1024, "tokens kept per example (longer ones lose their end); packed row length")
    packing: bool = _opt(False, "pack several examples into each row of max_length tokens (no attention "
                                "across examples)")
    chat_template: typing.Optional[str] = _opt(None, "Jinja chat-template file to use instead of the tokenizer's")
    dtype: str = _opt("auto", "auto (bf16 on CUDA for LoRA, fp32 otherwise), float32, bfloat16, float16")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N")
    save_every: int = _opt(0, "checkpoint every N optimizer steps (0: at the end of each epoch)")

    def validate(self) -> "SftConfig":
        if not self.data:
            raise UqloraError("config: data is required: --data FILE (e.g. ../shared/data/sft/lima.json.gz)")
        for name in ("epochs", "lr", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "temperature"):
            if not getattr(self, name) > 0:
                raise UqloraError(f"config: {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise UqloraError("config: max_length must be at least 2 (a token and its successor)")
        if self.max_examples is not None and self.max_examples <= 0:
            raise UqloraError(f"config: max_examples must be > 0, got {self.max_examples}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UqloraError(f"config: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.softcap is not None and not self.softcap > 0:
            raise UqloraError(f"config: softcap must be > 0 (or unset), got {self.softcap}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UqloraError(f"config: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UqloraError(f"config: warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if min(self.max_steps, self.save_every, self.max_grad_norm, self.weight_decay) < 0:
            raise UqloraError("config: max_steps, save_every, max_grad_norm and weight_decay must be >= 0")
        if not self.full_finetune and not self.lora_targets:
            raise UqloraError("config: lora_targets must name at least one module")
        return self

    @property
    def method(self) -> str:
        return FULL_METHOD if self.full_finetune else LORA_METHOD

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_config(config: SftConfig, run_dir: Path) -> dict:
    """What config.yaml holds: the SftConfig plus `method`; full fine-tuning points `model` at RUN/model (what
    `uqlora evaluate` loads) and keeps the original in `base_model`."""
    values = {**config.to_dict(), "method": config.method}
    if config.full_finetune:
        values.update(model=str((Path(run_dir) / "model").resolve()), base_model=config.model)
    return values


def config_from_run(saved: dict, where: str) -> SftConfig:
    """The SftConfig a run was made with, from its config.yaml (the inverse of `run_config`)."""
    values = dict(saved)
    method = values.pop("method", None)
    if method not in (LORA_METHOD, FULL_METHOD):
        raise UqloraError(f"{where}: a {method} run, not one made by `uqlora sft`")
    if "base_model" in values:
        values["model"] = values.pop("base_model")
    return from_mapping(values, where, SftConfig)
