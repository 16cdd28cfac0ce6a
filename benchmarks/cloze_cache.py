"""Does sharing the question's KV cache across its choices pay? (framing.cloze_scores)

Side by side in one process, alternating: uqlora's cloze scores (question encoded once, its cache selected
per choice) against the naive way (every prompt + choice as its own right-padded sequence, one forward).
Both score the same real questions with SmolLM2-135M; the script checks they agree and prints the
time ratio, with and without gradients (training also runs the framing).

    .venv/bin/python benchmarks/cloze_cache.py [--task arc-e] [--questions 64] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from uqlora.data import load_questions
from uqlora.framing import cloze_prompt, cloze_scores
from uqlora.models import load_model


def naive_cloze_scores(model, tokenizer, questions) -> torch.Tensor:
    """Mean choice log-prob from full prompt + choice sequences: [B, C_max] (-inf for absent choices)."""
    rows, spans = [], []
    for b, q in enumerate(questions):
        prompt = tokenizer.encode(cloze_prompt(q))
        for c, text in enumerate(q.choices):
            cont = tokenizer.encode(" " + text, add_special_tokens=False)
            rows.append(prompt + cont)
            spans.append((b, c, len(prompt), len(cont)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [K, L, V]
    scores = torch.full((len(questions), max(len(q.choices) for q in questions)), float("-inf"))
    for k, (b, c, start, n) in enumerate(spans):
        positions = torch.arange(start - 1, start - 1 + n)
        scores[b, c] = logp[k, positions, ids[k, positions + 1]].mean()
    return scores


def timed(fn, batches, grad: bool) -> float:
    start = time.perf_counter()
    for batch in batches:
        with torch.set_grad_enabled(grad):
            scores = fn(batch)
            if grad:
                scores[torch.isfinite(scores)].sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc-e")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", quiet=True)
    questions = load_questions(args.task, "test", max_examples=args.questions)
    batches = [questions[i:i + args.batch] for i in range(0, len(questions), args.batch)]
    with torch.no_grad():
        ours, naive = cloze_scores(model, tokenizer, batches[0]), naive_cloze_scores(model, tokenizer, batches[0])
    assert torch.allclose(ours, naive, atol=1e-3), "the two ways disagree"

    cached_fn = lambda b: cloze_scores(model, tokenizer, b)  # noqa: E731
    naive_fn = lambda b: naive_cloze_scores(model, tokenizer, b)  # noqa: E731
    for grad in (False, True):
        cached = naive_t = 0.0
        for _ in range(args.repeats):  # alternate so both see the same machine load
            cached += timed(cached_fn, batches, grad)
            naive_t += timed(naive_fn, batches, grad)
        mode = "forward+backward" if grad else "forward"
        print(f"{mode:17s} {args.task} {len(questions)} questions, batch {args.batch}, {args.repeats} repeats: "
              f"shared cache {cached:.1f} s, naive {naive_t:.1f} s, speed-up {naive_t / cached:.2f}x")


if __name__ == "__main__":
    main()
