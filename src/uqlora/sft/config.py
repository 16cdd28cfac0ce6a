"""`uqlora sft` configuration: one dataclass is the YAML file, the CLI flags and the run's config.yaml
(with the helpers of uqlora.config: defaults < `--config FILE.yaml` < flags)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import LoraRunOptions, _opt, from_mapping
from ..errors import UqloraError

# Methods written in config.yaml: LoRA runs (an adapter over `model`) and full fine-tuning (the run's own model/).
LORA_METHOD, FULL_METHOD = "sft", "sft-full"


@dataclass
class SftConfig(LoraRunOptions):
    data: typing.Optional[str] = _opt(None, "instruction data (required): JSON array or JSONL, .gz allowed, of "
                                            "instruction/input/output/history rows or chat `messages` rows")
    epochs: int = _opt(1, "passes over the examples (ignored when max_steps is set)")
    max_steps: int = _opt(0, "optimizer steps to train (0: `epochs` epochs); the lr schedule spans them")
    lr: float = _opt(2e-4, "peak AdamW learning rate (LoRA; use ~1e-5 for full fine-tuning)")
    batch_size: int = _opt(4, "sequences per micro-batch (packed rows with --packing), over all processes")
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

    def validate(self) -> "SftConfig":
        if not self.data:
            raise UqloraError("config: data is required: --data FILE (e.g. ../shared/data/sft/lima.json.gz)")
        self.check_shared(("epochs", "lr", "batch_size", "max_length", "temperature"))
        if self.max_length < 2:
            raise UqloraError("config: max_length must be at least 2 (a token and its successor)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UqloraError(f"config: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.softcap is not None and not self.softcap > 0:
            raise UqloraError(f"config: softcap must be > 0 (or unset), got {self.softcap}")
        if self.max_steps < 0:
            raise UqloraError(f"config: max_steps must be >= 0, got {self.max_steps}")
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
