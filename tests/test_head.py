"""head.py: the framings' logits from the decoder and the output layer at the needed positions only.

Oracle: the model's own forward (`SEPARABLE` off), which computes every position's logits. Both framings' scores
and the LoRA gradients of a loss on them must agree; a model whose forward transforms its logits is detected and
keeps its own forward.
"""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl_task
from uqlora.data import load_questions
from uqlora.framing import class_scores
from uqlora.head import SEPARABLE, causal_lm, check_separable_head
from uqlora.models import add_lora, load_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", quiet=True)
    assert getattr(model, SEPARABLE) is True  # load_model checked it
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, p in model.named_parameters():  # B = 0 at initialisation: give the adapter an effect
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


@pytest.mark.parametrize("framing", ["cloze", "letter"])
def test_head_path_equals_the_models_forward(lora_model, tmp_path, framing):
    """Scores [B, C] and the LoRA gradients of their cross-entropy: decoder + head == the model's forward (1e-5)."""
    model, tokenizer = lora_model
    questions = load_questions(f"jsonl:{write_jsonl_task(tmp_path / 'q.jsonl', 6)}", "test")
    labels = torch.tensor([q.label for q in questions])
    results = []
    for separable in (True, False):
        setattr(causal_lm(model), SEPARABLE, separable)
        model.zero_grad()
        scores = class_scores(framing, model, tokenizer, questions)
        torch.nn.functional.cross_entropy(scores, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((scores.detach(), grads))
    setattr(causal_lm(model), SEPARABLE, True)
    (fast, fast_grads), (own, own_grads) = results
    torch.testing.assert_close(fast, own, rtol=0, atol=1e-5)
    for name in own_grads:
        torch.testing.assert_close(fast_grads[name], own_grads[name], rtol=1e-4, atol=1e-6)


def test_transformed_logits_keep_the_models_forward(tiny_model_dir):
    """A model whose forward rescales its logits (here by a hook) is not separable: the framings use its forward."""
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", quiet=True)
    handle = model.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 2) or out)
    assert check_separable_head(model, tokenizer.encode("Question: why?\nAnswer:")) is False
    assert getattr(model, SEPARABLE) is False
    handle.remove()
    assert check_separable_head(model, tokenizer.encode("Question: why?\nAnswer:")) is True
