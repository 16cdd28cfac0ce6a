"""What a saved SWAG posterior holds: how wide it is against the weights, and whether its deviations are a
stationary cloud or one drift (BENCHMARKS.md "SWAG: why the direction is weak", issue 3).

For each SWAG run (posterior/swag.safetensors, Maddox et al. 2019 Sec. 4.2: mean theta_bar, second moment,
deviation rows D [K, P]) it prints, for the LoRA A and B factors separately:
- mean |theta_bar| and the mean per-weight standard deviation sqrt(theta_bar2 - theta_bar^2) (the diagonal part);
- the root mean square displacement of a draw at scale 1, sqrt(E|theta~ - theta_bar|^2 / P), from the
  covariance's trace: tr(Sigma) = sum(diag) / 2 + |D|_F^2 / (2 (K - 1));
- the norms of the deviation rows in collection order: growing steadily = the iterates are still travelling;
- the share of |D|_F^2 in D's first singular direction: near 1 = the low-rank part is one direction (a drift);
and with --map, |theta_MAP - theta_bar| for the MAP run of the same seed (how far the SWA mean is from the end
of plain training). Reads the model only for the LoRA parameters' order (the flattening order of theta).

    .venv/bin/python benchmarks/swag_posterior.py SWAG_RUN... [--map MAP_RUN]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from uqlora import runs
from uqlora.methods.swag import lora_parameters
from uqlora.models import load_adapter, load_model


def layout(run: Path) -> list[tuple[str, int]]:
    """(name, size) of each LoRA weight in theta's order, from the run's model with its adapter attached."""
    config = runs.read_config(run)
    model, _ = load_model(config["model"], dtype="float32", quiet=True)
    model = load_adapter(model, run / runs.ADAPTER)
    names = [(name, p.numel()) for name, p in model.named_parameters() if "lora_" in name and ".default." in name]
    assert [size for _, size in names] == [p.numel() for p in lora_parameters(model)]  # the same selection
    return names


def groups(names: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """'A' and 'B': boolean masks [P] over theta."""
    masks = {"A": [], "B": []}
    for name, size in names:
        for key in masks:
            masks[key].append(torch.full((size,), f"lora_{key}." in name))
    return {key: torch.cat(m) for key, m in masks.items()}


def flat_adapter(run: Path, names: list[tuple[str, int]]) -> torch.Tensor:
    """The run's saved adapter as theta [P] in the same order (PEFT saves the names without the adapter name)."""
    saved = load_file(str(run / runs.ADAPTER / "adapter_model.safetensors"))
    return torch.cat([saved[name.replace(".default", "")].flatten().float() for name, _ in names])


def report(run: Path, names: list[tuple[str, int]], map_run: Path | None) -> None:
    state = load_file(str(run / runs.POSTERIOR / "swag.safetensors"))
    mean, n = state["mean"], int(state["n_collected"])  # [P]
    var = (state["sq_mean"] - mean * mean).clamp_min(0)  # [P]
    k = min(n, int(state["rank"]))
    order = [(n - k + i) % int(state["rank"]) for i in range(k)]  # ring buffer rows, oldest first
    dev = state["deviations"][order]  # [k, P]
    print(f"\n{run}: {n} snapshots, {k} deviation rows, |theta_bar| = {mean.norm():.3f} (P = {mean.numel()})")
    print("part | P | mean abs(theta_bar) | mean std (diag) | rms draw displacement | |theta_MAP - theta_bar|")
    theta_map = flat_adapter(map_run, names) if map_run else None
    for key, mask in groups(names).items():
        low_rank = (dev[:, mask] ** 2).sum() / (2 * (k - 1)) if k > 1 else torch.tensor(0.0)
        trace = var[mask].sum() / 2 + low_rank
        gap = f"{(theta_map[mask] - mean[mask]).norm():.3f}" if theta_map is not None else "-"
        print(f"{key} | {int(mask.sum())} | {mean[mask].abs().mean():.2e} | {var[mask].sqrt().mean():.2e} | "
              f"{(trace / mask.sum()).sqrt():.2e} | {gap}")
    norms = dev.norm(dim=1)
    print("deviation row norms, oldest first: " + " ".join(f"{v:.3f}" for v in norms))
    if k > 1:
        s = torch.linalg.svdvals(dev)
        print(f"share of |D|_F^2 in its first direction: {float(s[0] ** 2 / (s ** 2).sum()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="SWAG run directories")
    parser.add_argument("--map", type=Path, help="the MAP run of the same seed and data")
    args = parser.parse_args()
    names = layout(args.runs[0])
    for run in args.runs:
        report(run, names, args.map)


if __name__ == "__main__":
    main()
