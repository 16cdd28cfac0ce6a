"""How much a C-LoRA posterior's noise moves a trained run's layers and answers (BENCHMARKS.md "BLoB and C-LoRA
at 10 epochs", issue 5).

For a clora run (methods/clora.py: h = W0 x + s·B(E z), z = A x, E ~ N(M(z), diag σ(z)²) per token) and the
first N test questions of its task, it prints per adapted projection (q_proj, v_proj, ...), over the real tokens
of every forward of the cloze scoring at the posterior mean:
- |W0 x|, |s·B M z| (the adapter's mean update) and the noise's root mean square size
  sqrt(E|s·B (σ⊙ε) z|²) = s·sqrt(Σ_j |B_:j|² Σ_k σ_jk² z_k²) (exact: the entries of ε are independent);
- |M z| / |z|: how far the mean E has grown from I (B E A is unchanged by E -> cE, B -> B/c, while the noise's
  share of the update shrinks by c: the adapter escapes the noise by growing M);
- the mean σ over the r² entries of E;
and over S draws of the predictive (draw_generator(seed, 0, s), as `evaluate`): the mean mutual information
(nats), the mean over questions of the standard deviation over draws of log p(answer), and how often the
argmax differs from the posterior mean's.

    .venv/bin/python benchmarks/clora_noise.py RUN [--questions N] [--samples S]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from uqlora import runs
from uqlora.data.load import load_questions
from uqlora.evaluate import open_run
from uqlora.framing import class_scores


SUMS = ("base", "update", "noise", "sigma", "tokens", "mixed", "z")  # what layer_sizes adds up per projection


def layer_sizes(opened, questions) -> dict[str, dict[str, float]]:
    """Per projection kind, sums over the real tokens: base Σ|W0 x|², update Σ|s·B M z|², noise Σ E|noise|²,
    sigma Σ (mean σ over E's entries), tokens (their count), mixed Σ|M z|², z Σ|z|²."""
    method, model = opened.method, opened.model
    method.mask.attach(model)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(SUMS, 0.0))
    handles = []
    for name, factor in method.factors.items():
        layer = model.get_submodule(name)
        adapter = next(iter(layer.lora_A))
        a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()  # [r, in], [out, r]
        s = layer.scaling[adapter]

        def hook(module, args, _out, factor=factor, a=a, b=b, s=s, kind=name.rsplit(".", 1)[-1]):
            x = args[0].float()  # [rows, T, in]
            real = factor.mask.positions(x).bool()  # [rows, T]
            z = x @ a.T  # [rows, T, r]
            mean, std = factor.distribution(z)
            mean, std = mean.float().expand(*z.shape, z.shape[-1]), std.float().expand(*z.shape, z.shape[-1])
            mixed = (mean @ z.unsqueeze(-1)).squeeze(-1)  # M z [rows, T, r]
            update = s * mixed @ b.T  # [rows, T, out]
            noise_sq = s ** 2 * ((std ** 2 * z.unsqueeze(-2) ** 2).sum(-1) * (b ** 2).sum(0)).sum(-1)  # [rows, T]
            per_token = {"base": module.base_layer(args[0]).float().pow(2).sum(-1), "update": update.pow(2).sum(-1),
                         "noise": noise_sq, "sigma": std.mean((-2, -1)), "tokens": torch.ones_like(noise_sq),
                         "mixed": mixed.pow(2).sum(-1), "z": z.pow(2).sum(-1)}  # each [rows, T]
            for key, value in per_token.items():
                sums[kind][key] += value[real].sum().item()

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            class_scores(opened.framing, model, opened.tokenizer, questions)
    finally:
        for h in handles:
            h.remove()
        method.mask.detach()
    return sums


def entropy(p: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [...] nats."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    config = runs.read_config(args.run)
    if config["method"] != "clora":
        raise SystemExit(f"{args.run} is a {config['method']} run, not a clora run")
    opened = open_run(args.run, config, "clora", {}, device="cpu", quiet=True)
    questions = load_questions(config["task"], "test")[: args.questions]
    print(f"{args.run}: {len(questions)} test questions of {config['task']}, {args.samples} draws")
    print(f"{'layer':<8} {'|W0 x|':>9} {'|sBMz|':>9} {'noise':>9} {'noise/upd':>9} {'upd/W0x':>9} {'|Mz|/|z|':>9} "
          f"{'mean σ':>7}")
    for kind, t in sorted(layer_sizes(opened, questions).items()):
        n = t["tokens"]
        b, u, e = (t["base"] / n) ** 0.5, (t["update"] / n) ** 0.5, (t["noise"] / n) ** 0.5
        print(f"{kind:<8} {b:9.3f} {u:9.4f} {e:9.4f} {e / u:9.3f} {u / b:9.4f} {(t['mixed'] / t['z']) ** 0.5:9.3f} "
              f"{t['sigma'] / n:7.3f}")

    def score(qs):
        return class_scores(opened.framing, opened.model, opened.tokenizer, qs)

    with torch.no_grad():
        at_mean = opened.method.predict(score, questions, 0)[0]  # [B, C]
        draws = opened.method.predict(score, questions, args.samples)  # [S, B, C]
    mixture = draws.mean(0)  # [B, C]
    mutual_information = entropy(mixture) - entropy(draws).mean(0)  # [B]
    labels = torch.tensor([q.label for q in questions])
    log_answer = draws[:, torch.arange(len(questions)), labels].clamp_min(1e-30).log()  # [S, B]
    flips = (draws.argmax(-1) != at_mean.argmax(-1)).float().mean()
    print(f"mutual information {mutual_information.mean():.5f} nats; std over draws of log p(answer) "
          f"{log_answer.std(0).mean():.4f}; argmax differs from the mean's in {100 * flips:.1f} % of draws")


if __name__ == "__main__":
    main()
