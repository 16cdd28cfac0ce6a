"""What does SWAG collection cost during training, and how much memory does its state take?

One process, one model: real SmolLM2-135M with the default LoRA (r=8, q_proj and v_proj), cloze framing, batches
of real questions. Each iteration times a plain optimizer step (forward, backward, AdamW), then a SWAG collection
(flatten the LoRA weights, update the two moments and the deviation ring buffer) as `uqlora train --method swag`
does after a step; the ratio is summed collection time / summed step time. Collecting after every step is the
worst case; the default (once per epoch) costs 1/steps_per_epoch of it.

    .venv/bin/python benchmarks/swag_overhead.py [--task obqa] [--steps 20] [--batch 8] [--rank 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from uqlora.data import load_questions
from uqlora.framing import class_scores
from uqlora.methods.swag import flatten, lora_parameters
from uqlora.methods.swag_moments import SwagMoments
from uqlora.models import add_lora, default_framing, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="obqa")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=20, help="SWAG rank K")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", quiet=True)
    framing = default_framing("smollm2-135m", model)
    torch.manual_seed(0)
    model = add_lora(model, r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    model.train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    moments = SwagMoments(sum(p.numel() for p in params), args.rank, device=params[0].device)
    questions = load_questions(args.task, "train", max_examples=args.steps * args.batch)

    step_s = collect_s = 0.0
    for i in range(args.steps):
        batch = questions[i * args.batch:(i + 1) * args.batch]
        start = time.perf_counter()
        scores = class_scores(framing, model, tokenizer, batch, 512)  # [B, C]
        F.cross_entropy(scores, torch.tensor([q.label for q in batch])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        middle = time.perf_counter()
        moments.collect(flatten(params))
        end = time.perf_counter()
        if i > 0:  # the first step warms up allocators and caches
            step_s += middle - start
            collect_s += end - middle

    n = args.steps - 1
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.task}, batch {args.batch}, {n} timed steps, SWAG rank K={args.rank}, P={moments.n_params:,} LoRA weights")
    print(f"plain step {step_s / n:.3f} s, collection {1e3 * collect_s / n:.2f} ms: "
          f"overhead {100 * collect_s / step_s:.3f} % when collecting after every step")
    print(f"SWAG state {(args.rank + 2)} x P x 4 B = {moments.nbytes() / 2**20:.1f} MiB "
          f"({moments.nbytes() / lora_bytes:.0f}x the LoRA weights, {100 * moments.nbytes() / model_bytes:.1f} % "
          f"of the model's {model_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
