"""Two gloo processes (torchrun, which `Accelerator()` picks up) train and evaluate exactly like one:
the same adapter up to float summation order, every question predicted once, the same metrics.

DESIGN.md: on these CPU machines `accelerate launch --cpu --num_processes 2` starts a single process, so
the test launches with torchrun; GPU users use `accelerate launch` (README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import write_jsonl_task


def uqlora(*argv, processes: int = 1):
    if processes == 1:
        cmd = [sys.executable, "-m", "uqlora.cli", *map(str, argv)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", "29517", "-m", "uqlora.cli", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    # 22 questions: micro-batches of 4 leave a last step of 2, split 1 + 1, and an odd eval shard.
    task = f"jsonl:{write_jsonl_task(tmp_path / 'arith.jsonl', 22)}"
    args = ["--model", tiny_model_dir, "--task", task, "--epochs", "2", "--batch-size", "4", "--lr", "5e-3",
            "--lora-dropout", "0", "--device", "cpu", "--framing", "cloze", "--quiet"]
    for n in (1, 2):
        uqlora("train", *args, "--out", tmp_path / f"p{n}", processes=n)
        uqlora("evaluate", tmp_path / f"p{n}", "--task", task, "--batch-size", "3", "--quiet", processes=n)

    one = load_file(tmp_path / "p1" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "p2" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)

    m1, m2 = (json.loads((tmp_path / f"p{n}" / "eval" / "jsonl-arith" / "metrics.json").read_text()) for n in (1, 2))
    assert m1["n"] == m2["n"] == 22
    for key in ("accuracy", "ece", "nll", "brier", "rms_ce"):
        assert abs(m1[key] - m2[key]) < 1e-4, key
    ids = [json.loads(line)["id"] for line in
           (tmp_path / "p2" / "eval" / "jsonl-arith" / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"q{i}" for i in range(22)]  # each question once, in order
    summary = json.loads((tmp_path / "p2" / "train_summary.json").read_text())
    assert summary["processes"] == 2


def test_swag_two_processes_equal_one(tmp_path, tiny_model_dir):
    """SWAG under two processes: the same moments (every process collects the same all-reduced weights) and
    the same sampled predictive (draws are seeded per sample, not per process)."""
    task = f"jsonl:{write_jsonl_task(tmp_path / 'arith.jsonl', 22)}"
    args = ["--model", tiny_model_dir, "--task", task, "--epochs", "2", "--batch-size", "4", "--lr", "5e-3",
            "--lora-dropout", "0", "--device", "cpu", "--framing", "cloze", "--quiet", "--method", "swag",
            "--swag-every", "1", "--swag-rank", "3"]
    for n in (1, 2):
        uqlora("train", *args, "--out", tmp_path / f"p{n}", processes=n)
        uqlora("evaluate", tmp_path / f"p{n}", "--task", task, "--samples", "3", "--quiet", processes=n)
    one, two = (load_file(tmp_path / f"p{n}" / "posterior" / "swag.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and one["n_collected"].item() == 6
    for k in one:
        torch.testing.assert_close(one[k].float(), two[k].float(), atol=1e-5, rtol=1e-4)
    p1, p2 = ([json.loads(line)["probs"] for line in (tmp_path / f"p{n}" / "eval" / "jsonl-arith" /
                                                        "predictions.jsonl").read_text().splitlines()]
              for n in (1, 2))
    torch.testing.assert_close(torch.tensor(p1), torch.tensor(p2), atol=1e-4, rtol=0)
