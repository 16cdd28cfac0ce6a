"""What does the Laplace-LoRA fit cost against a training epoch, and how much memory do its factors take?

One process, one model: a trained MAP run's adapter on its base model (SmolLM2-135M for runs of
benchmarks/foundation.sh), on N of the questions it trained on. Measured side by side, twice, in the order
epoch, fisher fit, ggn fit (the minimum of the two repetitions is reported):
  - epoch: N/batch optimizer steps as `uqlora train` takes them (forward, backward, AdamW) on a copy of the
    adapter weights, restored afterwards;
  - fit:   `fit_kfac` over the same N questions with the run's settings (accumulation + the final
    eigendecompositions, a fixed cost that a longer fit amortises: printed apart).
Memory: the bytes of the saved factors for this run, and computed for a 7B-size configuration (LLaMA-2-7B:
32 layers, hidden 4096, q_proj and v_proj 4096 -> 4096, r = 8) with sides above kfac_max_full_dim as
low-rank (kfac_rank eigenpairs) + diagonal.

    .venv/bin/python benchmarks/laplace_cost.py RUN [--questions 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from uqlora import runs
from uqlora.config import from_mapping
from uqlora.evaluate import open_run
from uqlora.framing import class_scores
from uqlora.methods.laplace import blocks_state
from uqlora.posthoc.curvature import fit_kfac, lora_linears
from uqlora.posthoc.fit import training_questions

FLOAT_BYTES = 4
LLAMA2_7B = dict(layers=32, hidden=4096, targets=2, r=8)  # q_proj and v_proj: 4096 -> 4096


def factor_bytes(dim: int, max_full_dim: int, rank: int) -> int:
    """Saved bytes of one factor side: eigvecs + eigvals (full), or k eigvecs + k eigvals + the diagonal."""
    if dim <= max_full_dim:
        return (dim * dim + dim) * FLOAT_BYTES
    k = min(rank, dim)
    return (dim * k + k + dim) * FLOAT_BYTES


def llama7b_bytes(max_full_dim: int, rank: int) -> int:
    c = LLAMA2_7B
    per_target = (factor_bytes(c["hidden"], max_full_dim, rank) + factor_bytes(c["r"], max_full_dim, rank)  # lora_A
                  + factor_bytes(c["r"], max_full_dim, rank) + factor_bytes(c["hidden"], max_full_dim, rank))  # lora_B
    return c["layers"] * c["targets"] * per_target


def time_epoch(model, params, score_fn, questions, batch: int) -> float:
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(questions), batch):
        qs = questions[i:i + batch]
        F.cross_entropy(score_fn(qs), torch.tensor([q.label for q in qs])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    model.eval()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished map run")
    parser.add_argument("--questions", type=int, default=128)
    args = parser.parse_args()

    saved = runs.read_config(args.run)
    config = from_mapping({**saved, "method": "map"}, str(args.run))
    _, model, tokenizer, framing, _ = open_run(args.run, {**saved, "method": "map"}, "map", {}, quiet=True)
    linears = lora_linears(model)
    params = [m.weight for m in linears.values()]
    for p in params:
        p.requires_grad_(True)
    questions = training_questions(config)[0][:args.questions]

    def score_fn(qs):
        return class_scores(framing, model, tokenizer, qs, config.max_length)

    time_epoch(model, params, score_fn, questions[:config.batch_size], config.batch_size)  # warm-up
    best = {"epoch": float("inf"), "fisher": float("inf"), "ggn": float("inf")}
    finalize = float("inf")
    for _ in range(2):
        best["epoch"] = min(best["epoch"], time_epoch(model, params, score_fn, questions, config.batch_size))
        for curvature in ("fisher", "ggn"):
            start = time.perf_counter()
            fit = fit_kfac(model, linears, score_fn, questions, curvature=curvature, batch_size=config.batch_size,
                           max_full_dim=config.kfac_max_full_dim, rank=config.kfac_rank, seed=0, quiet=True)
            best[curvature] = min(best[curvature], time.perf_counter() - start)
            finalize = min(finalize, fit.factor_seconds)

    state = blocks_state(fit.blocks, 1.0)
    ours = sum(t.numel() * t.element_size() for t in state.values())
    n = len(questions)
    print(f"run {args.run}, {n} questions, batch {config.batch_size}, {len(linears)} LoRA linears, "
          f"{sum(p.numel() for p in params)} parameters")
    print(f"epoch (train steps) {best['epoch']:.1f} s")
    for curvature in ("fisher", "ggn"):
        print(f"fit {curvature:6s} {best[curvature]:.1f} s = {best[curvature] / best['epoch']:.2f} x epoch "
              f"(of which {finalize:.1f} s final eigendecompositions; without them "
              f"{(best[curvature] - finalize) / best['epoch']:.2f} x)")
    print(f"factor memory: this run {ours / 2**20:.1f} MiB; LLaMA-2-7B q,v r=8 at kfac_max_full_dim "
          f"{config.kfac_max_full_dim}, kfac_rank {config.kfac_rank}: "
          f"{llama7b_bytes(config.kfac_max_full_dim, config.kfac_rank) / 2**20:.1f} MiB "
          f"(all sides full: {llama7b_bytes(10**9, config.kfac_rank) / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
