"""Both framings against a direct computation on the model, one question at a time, without padding or cache."""

from __future__ import annotations

import pytest
import torch

from uqlora.data.question import Question
from uqlora.errors import UqloraError
from uqlora.framing import (class_scores, cloze_prompt, cloze_scores, letter_prompt, letter_scores,
                            letter_token_ids)
from uqlora.models import add_lora

from conftest import tiny_llama

QUESTIONS = [
    Question("a", "What do plants need to make food?", ("sunlight", "a lot of loud music", "sand", "cold iron"), 0),
    Question("b", "Which one barks?", ("a cat", "the dog next door", "fish"), 1, context="Pets live in houses."),
    Question("c", "Fill in: the _ is hot.", ("sun", "snow"), 0),
]


def direct_cloze(model, tokenizer, q: Question) -> list[float]:
    """Mean log p(choice tokens | prompt) from one unpadded forward over prompt + choice."""
    out = []
    for choice in q.choices:
        prompt = tokenizer.encode(cloze_prompt(q))
        cont = tokenizer.encode(" " + choice, add_special_tokens=False)
        logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
        out.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont)) / len(cont))
    return out


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, seed=3)


def test_cloze_equals_direct_log_likelihood(model, tokenizer):
    """Batched, padded, KV-cache-sharing cloze scores = per-choice log-likelihoods computed directly."""
    with torch.no_grad():
        scores = cloze_scores(model, tokenizer, QUESTIONS)
        for b, q in enumerate(QUESTIONS):
            assert scores[b, : len(q.choices)].tolist() == pytest.approx(direct_cloze(model, tokenizer, q), abs=1e-4)
            assert torch.isinf(scores[b, len(q.choices):]).all()


def test_cloze_through_lora_and_gradients(model, tokenizer):
    """The same equality through a PEFT LoRA model with non-zero B, and the loss reaches the LoRA weights."""
    lora = add_lora(tiny_llama(tokenizer, seed=3), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    scores = cloze_scores(lora, tokenizer, QUESTIONS)
    with torch.no_grad():
        for b, q in enumerate(QUESTIONS):
            assert scores[b, : len(q.choices)].tolist() == pytest.approx(direct_cloze(lora, tokenizer, q), abs=1e-4)
    torch.nn.functional.cross_entropy(scores, torch.tensor([q.label for q in QUESTIONS])).backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_letter_prompt_and_tokens(tokenizer):
    """The letter prompt lists lettered choices and ends in 'Answer:'; ' A'..' E' are single distinct tokens."""
    assert letter_prompt(QUESTIONS[1]) == "Pets live in houses.\nQuestion: Which one barks?\nA. a cat\nB. the dog next door\nC. fish\nAnswer:"
    ids = letter_token_ids(tokenizer, 5)
    assert len(set(ids)) == 5
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]


def test_letter_scores_equal_last_position_logits(model, tokenizer):
    """Left-padded batch: scores = next-token logits of the letters after the unpadded prompt."""
    with torch.no_grad():
        scores = letter_scores(model, tokenizer, QUESTIONS)
        ids = letter_token_ids(tokenizer, 4)
        for b, q in enumerate(QUESTIONS):
            logits = model(torch.tensor([tokenizer.encode(letter_prompt(q))])).logits[0, -1]
            n = len(q.choices)
            assert scores[b, :n].tolist() == pytest.approx(logits[ids[:n]].tolist(), abs=1e-4)


class SplittingTokenizer:
    """Splits ' C' into two tokens, as some tokenizers do."""

    def encode(self, text, add_special_tokens=False):
        return [7, 8] if text == " C" else [ord(text[-1])]


def test_letter_refuses_multi_token_letters():
    with pytest.raises(UqloraError, match="splits ' C' into 2 tokens"):
        letter_token_ids(SplittingTokenizer(), 4)


def test_unknown_framing(model, tokenizer):
    with pytest.raises(UqloraError, match="unknown framing"):
        class_scores("guess", model, tokenizer, QUESTIONS)
