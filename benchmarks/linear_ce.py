"""Peak memory and time of uqlora.losses.linear_cross_entropy against the naive F.cross_entropy(F.linear(...)).

Forward + backward of a mean-reduced, label-smoothed LM-head loss: hidden [N, D] and weight [V, D] require
gradients, no bias, random targets. Each variant runs in its own subprocess so that its peak memory is its own.
Peak extra memory is measured above the inputs (it includes the gradients hidden.grad and weight.grad): on CUDA
torch.cuda.max_memory_allocated after the inputs are made; on CPU the peak resident set (getrusage ru_maxrss)
minus the resident set once the inputs exist. Time is the median over --repeats after --warmup runs.

Rows: at eps=0.1 ours vs naive (the goal: memory <= 0.25x, time <= 1.0x); at eps=0 ours vs torch's own chunked
`F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())` when this torch has it; then memory only at
--big-v (a Llama-3 vocabulary). fp32 on CPU; on CUDA bf16, with ours on the Triton kernel when triton is
importable and on its torch rows as well.

    .venv/bin/python benchmarks/linear_ce.py [--n 4096] [--d 1024] [--v 32000] [--big-v 128256] [--repeats 3]
                                             [--warmup 1] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from uqlora.losses import chunked_linear_cross_entropy, linear_cross_entropy, torch_rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _loss_fn(variant: str, eps: float):
    if variant == "naive":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w), t, label_smoothing=eps)
    if variant == "ours":  # Triton kernel on CUDA when importable, else the torch rows
        return lambda h, w, t: linear_cross_entropy(h, w, t, label_smoothing=eps)
    if variant == "ours-torch-rows":
        return lambda h, w, t: chunked_linear_cross_entropy(torch_rows, h, w, t, bias=None, ignore_index=-100,
                                                            label_smoothing=eps, reduction="mean", softcap=None,
                                                            chunk_size=None)
    if variant == "torch-chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, label_smoothing=eps, options=options)
    raise ValueError(variant)


def worker(args) -> None:
    """One variant in this process: prints {"peak_mib", "time_s"} as JSON."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    # made in place, so that making them leaves no transient peak above the baseline (fp32 on CPU)
    hidden = torch.randn(args.n, args.d, generator=gen, device=device).div_(args.d**0.25).to(dtype).requires_grad_()
    weight = torch.randn(args.v, args.d, generator=gen, device=device).div_(args.d**0.25).to(dtype).requires_grad_()
    target = torch.randint(0, args.v, (args.n,), generator=gen, device=device)
    fn = _loss_fn(args.worker, args.eps)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        fn(hidden, weight, target).backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mib": max(0, peak - base) / 2**20, "time_s": statistics.median(times)}))


def run(args, variant: str, v: int, eps: float, timed: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--n", str(args.n), "--d", str(args.d), "--v", str(v),
           "--eps", str(eps), "--device", args.device, "--dtype", args.dtype,
           "--repeats", str(args.repeats if timed else 1), "--warmup", str(args.warmup if timed else 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens")
    parser.add_argument("--d", type=int, default=1024, help="hidden size")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary")
    parser.add_argument("--big-v", type=int, default=128256, help="vocabulary of the memory-only rows (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--eps", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        return worker(args)

    cuda = args.device.startswith("cuda")
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    ours = ["ours", "ours-torch-rows"] if cuda and has_triton else ["ours"]
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, N={args.n}, D={args.d}; forward + backward, "
          f"mean reduction; ours = {'Triton kernel' if cuda and has_triton else 'chunked torch'}")
    print(f"{'variant':<16} {'eps':>4} {'V':>7} {'peak extra MiB':>15} {'time s':>8} {'mem ratio':>10} "
          f"{'time ratio':>11}")

    def row(variant, v, eps, ref=None, timed=True):
        r = run(args, variant, v, eps, timed)
        mem = f"{r['peak_mib'] / ref['peak_mib']:.3f}x" if ref else ""
        tim = f"{r['time_s'] / ref['time_s']:.3f}x" if ref and timed else ""
        t = f"{r['time_s']:.3f}" if timed else "-"
        print(f"{variant:<16} {eps:>4} {v:>7} {r['peak_mib']:>15.1f} {t:>8} {mem:>10} {tim:>11}", flush=True)
        return r

    naive = row("naive", args.v, 0.1)
    for variant in ours:
        row(variant, args.v, 0.1, naive)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        ref = row("torch-chunked", args.v, 0.0)
        for variant in ours:
            row(variant, args.v, 0.0, ref)
        print("(eps=0 ratios are against torch-chunked)")
    else:
        print(f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions: "
              "skipping the comparison with torch's chunked path")
    if args.big_v:
        print(f"memory only, V={args.big_v}:")
        naive = row("naive", args.big_v, 0.1, timed=False)
        for variant in ours:
            row(variant, args.big_v, 0.1, naive, timed=False)


if __name__ == "__main__":
    main()
