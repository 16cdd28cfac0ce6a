"""Does scoring S posterior draws in one forward pay? (methods/batched.py, `uqlora evaluate --sample-batch`)

Side by side in one process, alternating: the predictive of S = 10 draws computed batched (`--sample-batch S`:
the questions replicated S times, one forward per batch of questions; what `--sample-batch 0` does on CUDA) against the sequential loop
(`--sample-batch 1`: one forward per draw), both through `predict_probs` as `uqlora evaluate` calls it, on real
test questions with SmolLM2-135M. The LoRA adapter is random (r = 8 on q_proj and v_proj, B not 0) and its
posterior synthetic: the speed of a draw does not depend on what training left. The script checks that the two
give the same draws and prints the times and the speed-up.

    .venv/bin/python benchmarks/batched_sampling.py [--method swag] [--task arc-e] [--questions 48] [--batch 8]
                                                    [--samples 10] [--repeats 3] [--framing cloze] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from uqlora.config import TrainConfig
from uqlora.data import load_questions
from uqlora.methods import get_method
from uqlora.methods.base import Adapter
from uqlora.methods.batched import SEQUENTIAL
from uqlora.methods.blob import G_KEY, lora_layers
from uqlora.methods.swag import flatten, lora_parameters, write_flat
from uqlora.methods.swag_moments import SwagMoments
from uqlora.models import add_lora, default_framing, load_model
from uqlora.predict import predict_probs

MODEL = "smollm2-135m"
RANK, ALPHA, DROPOUT = 8, 16, 0.05  # uqlora train's LoRA defaults
WEIGHT_STD = 0.02  # of the random LoRA weights and of the synthetic posterior's spread
SWAG_SNAPSHOTS, SWAG_RANK = 5, 4
# largest difference allowed between the two paths' probabilities: fp32 rounding; in bf16 each path rounds its own
# way (measured on 8 ARC-E questions, 4 draws: sequential 2.5e-2 and batched 3.9e-2 from the fp32 draws)
AGREEMENT = {"float32": 1e-4, "bfloat16": 1e-1}


def posterior(method: str, model) -> dict[str, torch.Tensor]:
    """A synthetic posterior of the method for the model's adapter "default"."""
    if method == "swag":  # snapshots around the adapter, whose weights become their mean
        params = lora_parameters(model)
        theta = flatten(params)
        moments = SwagMoments(theta.numel(), SWAG_RANK)
        for _ in range(SWAG_SNAPSHOTS):
            moments.collect(theta + WEIGHT_STD * torch.randn_like(theta))
        write_flat(params, moments.mean)
        return moments.state_dict()
    if method == "blob":
        return {f"{n}.{G_KEY}": torch.full_like(m.lora_A["default"].weight, WEIGHT_STD ** 0.5)
                for n, m in lora_layers(model, "default").items()}  # Ω = G² = WEIGHT_STD
    if method == "clora":  # the initial E factors (M = I, σ ≈ 1/4): what the draws cost does not depend on them
        fresh = get_method("clora", TrainConfig(method="clora", lora_r=RANK))
        fresh.prepare(copy.deepcopy(model))
        return fresh.state_dict()
    return {}  # mc-dropout: the LoRA dropout is the posterior


def bound_method(name: str, dtype: str = "float32"):
    """(method, model, tokenizer): SmolLM2 with a random LoRA adapter and `name` bound to it, seed 0."""
    model, tokenizer = load_model(MODEL, device="cpu", dtype=dtype, quiet=True)
    torch.manual_seed(0)
    model = add_lora(model, r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=["q_proj", "v_proj"]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, WEIGHT_STD)
        state = posterior(name, model)
    method = get_method(name, TrainConfig(method=name, lora_r=RANK, lora_dropout=DROPOUT))
    method.bind(model, [Adapter("default", state)], seed=0)
    return method, model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="swag", choices=("swag", "mc-dropout", "blob", "clora"))
    parser.add_argument("--task", default="arc-e")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="questions per batch (evaluate --batch-size)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--framing", choices=("letter", "cloze"), help="default: the model's (cloze)")
    parser.add_argument("--dtype", choices=tuple(AGREEMENT), default="float32", help="base weights (default fp32)")
    args = parser.parse_args()

    from accelerate import Accelerator

    method, model, tokenizer = bound_method(args.method, args.dtype)
    framing = args.framing or default_framing(MODEL, model)
    questions = load_questions(args.task, "test", max_examples=args.questions)
    accelerator = Accelerator(cpu=True)

    def run(sample_batch: int, qs=questions):
        start = time.perf_counter()
        out = predict_probs(method, model, tokenizer, framing, qs, accelerator=accelerator, batch_size=args.batch,
                            max_length=512, n_samples=args.samples, quiet=True, keep_draws=True,
                            sample_batch=sample_batch)
        return time.perf_counter() - start, out.draw_probs  # [S, N, C]

    run(args.samples, questions[:args.batch])  # warm-up: allocator, kernels
    print(f"{args.method}, {framing}, {args.dtype}, {args.task}: {len(questions)} questions, batch {args.batch}, "
          f"S = {args.samples}, {torch.get_num_threads()} threads")
    batched = args.samples  # every draw in one forward (capped by the RAM estimate, as evaluate caps it)
    total_seq = total_bat = 0.0
    for repeat in range(args.repeats):  # alternate so both see the same machine load
        (seq_s, seq), (bat_s, bat) = run(SEQUENTIAL), run(batched)
        difference = float((seq - bat).abs().max())
        assert difference <= AGREEMENT[args.dtype], f"batched and sequential draws differ by {difference:.2e}"
        total_seq, total_bat = total_seq + seq_s, total_bat + bat_s
        print(f"repeat {repeat + 1}: sequential {seq_s:.1f} s, batched {bat_s:.1f} s, speed-up {seq_s / bat_s:.2f}x "
              f"(largest probability difference {difference:.1e})")
    print(f"total: sequential {total_seq:.1f} s, batched {total_bat:.1f} s, speed-up {total_seq / total_bat:.2f}x")


if __name__ == "__main__":
    main()
