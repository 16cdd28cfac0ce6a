"""Runs of `uqlora sft` (instruction tuning with label smoothing; Huang, Lu & Zeng, ICML 2025, "Calibrated Language
Models and How to Find Them with Label Smoothing") evaluated on multiple-choice tasks: the predictive is the
softmax of the class scores, one deterministic draw, as for MAP.

`sft`: a LoRA adapter in RUN/adapter/ over the base `model`. `sft-full`: full fine-tuning, whose config.yaml
`model` is the run's own RUN/model/ folder (`base_model`: what it started from); there is no adapter to load.
Both are made by `uqlora sft`, never by `uqlora train`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UqloraError
from .map import MapMethod

# config.yaml entries of an sft run that mean the same for `uqlora evaluate` as in a `uqlora train` run. The others
# are SFT options; `max_length` among them is the SFT sequence length, not evaluate's prompt length.
EVAL_KEYS = ("model", "method", "seed", "dtype", "device", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


class SftMethod(MapMethod):
    name = "sft"
    trained_by = "sft"

    def run_settings(self, config: dict, run_dir: Path) -> dict:
        return {k: config[k] for k in EVAL_KEYS if k in config}


class SftFullMethod(SftMethod):
    name = "sft-full"
    trains = False  # the fine-tuned weights are the run's model itself: no adapter

    def run_settings(self, config: dict, run_dir: Path) -> dict:
        settings = super().run_settings(config, run_dir)
        model = Path(settings["model"])
        if not (model / "config.json").is_file():
            moved = Path(run_dir) / "model"  # the run directory was moved or copied since training
            if not (moved / "config.json").is_file():
                raise UqloraError(f"{run_dir}: full fine-tuning run without its model/ folder (unfinished? "
                                  f"`uqlora sft --out {run_dir} --resume` finishes it)")
            settings["model"] = str(moved.resolve())
        return settings
