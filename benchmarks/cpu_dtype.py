"""What the CPU path costs in fp32 and bf16, and what computing logits only where needed saves (head.py).

Side by side in one process, alternating, on real ARC-C train questions with SmolLM2-135M + a LoRA adapter (r = 8
on q_proj and v_proj, dropout 0.05 as in training): one LoRA training step (cloze scores of a batch, cross-entropy,
backward) and one evaluation batch (no grad), for three set-ups:
- fp32, the model's own forward (every position's logits: what the framings did before head.py);
- fp32 with the head applied to the needed positions only (the default now);
- bf16 weights (eager attention on the CPU, models._attention) with the same head path; LoRA weights in fp32.
It prints the median seconds of each, the ratios to the first, and how far the scores of each are from the first,
below a line naming the CPU's kind: bf16 is fast only with bf16 matrix instructions (models.cpu_bf16_warning).

    .venv/bin/python benchmarks/cpu_dtype.py [--questions 48] [--batch 8] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from uqlora.data import load_questions
from uqlora.framing import cloze_scores
from uqlora.head import SEPARABLE, causal_lm
from uqlora.models import add_lora, cpu_bf16_warning, load_model

SETUPS = (("fp32, model's forward", "float32", False), ("fp32, head where needed", "float32", True),
          ("bf16, head where needed", "bfloat16", True))


def lora_model(dtype: str):
    model, tokenizer = load_model("smollm2-135m", dtype=dtype, device="cpu", quiet=True)
    model = add_lora(model, r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    for name, p in model.named_parameters():  # the same non-zero adapter in every set-up
        if "lora_" in name:
            p.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="official files (default: $UQLORA_DATA_DIR, ../shared/data)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions("arc-c", "train", data_dir=args.data_dir, max_examples=args.questions)
    batches = [questions[i:i + args.batch] for i in range(0, len(questions), args.batch)]
    models = {dtype: lora_model(dtype) for dtype in ("float32", "bfloat16")}
    train_s = {name: [] for name, _, _ in SETUPS}
    eval_s = {name: [] for name, _, _ in SETUPS}
    scores = {}  # set-up -> every probability of the warm-up's evaluation
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for name, dtype, separable in SETUPS:
            model, tokenizer = models[dtype]
            setattr(causal_lm(model), SEPARABLE, separable)
            model.train()
            torch.manual_seed(0)
            start = time.perf_counter()
            for batch in batches:
                s = cloze_scores(model, tokenizer, batch)  # [B, C]
                torch.nn.functional.cross_entropy(s, torch.tensor([q.label for q in batch])).backward()
                model.zero_grad()
            train_s[name].append((time.perf_counter() - start) / len(batches))
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                out = [cloze_scores(model, tokenizer, batch) for batch in batches]
            eval_s[name].append((time.perf_counter() - start) / len(batches))
            if repeat == 0:
                scores[name] = torch.cat([torch.softmax(o, -1).flatten() for o in out])
    base = SETUPS[0][0]
    print(f"{len(questions)} ARC-C train questions, batches of {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats after a warm-up")
    emulated = cpu_bf16_warning(torch.device("cpu"), torch.bfloat16) is not None
    print(f"PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()}; bf16 matrix instructions "
          f"(AVX512-BF16 or AMX): {'no, bf16 is emulated' if emulated else 'yes, or not an x86 CPU'}")
    print("| set-up | train step (s) | speed-up | eval batch (s) | speed-up | max abs prob. diff vs first |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _ in SETUPS:
        t, e = statistics.median(train_s[name][1:]), statistics.median(eval_s[name][1:])
        t0, e0 = statistics.median(train_s[base][1:]), statistics.median(eval_s[base][1:])
        diff = (scores[name] - scores[base]).abs().max().item()
        print(f"| {name} | {t:.2f} | {t0 / t:.2f}x | {e:.2f} | {e0 / e:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
