"""Two gloo processes (torchrun, which `Accelerator()` picks up) train, fit and evaluate exactly like one:
the same adapter, moments and K-FAC factors up to float summation order, every question predicted once, the same
metrics. Where a result is not the same (low-rank K-FAC factors, BLoB/C-LoRA noise), the test says why and how
close it is.

DESIGN.md: on these CPU machines `accelerate launch --cpu --num_processes 2` starts a single process, so
the test launches with torchrun; GPU users use `accelerate launch` (README)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl_task
from uqlora.posthoc.kfac import Factor
from uqlora.posthoc.logit_store import FILE as LOGIT_FILE


def uqlora(*argv, processes: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "uqlora.cli", *map(str, argv)]
    else:
        # --standalone: the rendezvous on a port the OS picks, so launches never clash (a slow exit, another
        # test session, any program holding a fixed port)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "uqlora.cli", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def probs(run, name: str = "jsonl-arith") -> torch.Tensor:
    lines = (run / "eval" / name / "predictions.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(line)["probs"] for line in lines])


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
    torch.testing.assert_close(probs(tmp_path / "p1"), probs(tmp_path / "p2"), atol=1e-4, rtol=0)


# Post-hoc fits on one MAP run (one process): 16 of the task's 22 questions trained on, so 6 are left to validate
# on (temperature, --prior-fit val-nll); two processes take 8 K-FAC questions and 3 validation questions each.
POSTHOC_TRAIN = ["--epochs", "1", "--batch-size", "4", "--lr", "5e-3", "--lora-dropout", "0", "--device", "cpu",
                 "--framing", "cloze", "--max-examples", "16", "--quiet"]


@pytest.fixture(scope="module")
def map_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("posthoc")
    task = f"jsonl:{write_jsonl_task(root / 'arith.jsonl', 22)}"
    args = ["--model", tiny_model_dir, "--task", task, *POSTHOC_TRAIN]
    uqlora("train", *args, "--out", root / "map")
    return root / "map", task, args


def factors(run) -> dict[str, Factor]:
    state = load_file(run / "posterior" / "laplace.safetensors")
    return {p: Factor.from_state_dict(state, p) for p in sorted({k.rsplit(".", 1)[0] for k in state
                                                                  if k != "prior_precision"})}


def fit_summary(run, name: str = "laplace.json") -> dict:
    return json.loads((run / "posterior" / name).read_text())


def assert_same_full_factors(one: dict[str, Factor], two: dict[str, Factor], rtol: float) -> None:
    """Full factors: the same matrices Q diag(e) Qᵀ (not the same eigenvectors: they may differ in sign or
    within a near-degenerate eigenspace), relative Frobenius error < rtol."""
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].is_full and two[name].is_full, name
        a, b = one[name].dense().double(), two[name].dense().double()
        assert torch.linalg.norm(a - b) <= rtol * torch.linalg.norm(a), name


def test_laplace_two_processes_equal_one(map_run, tmp_path):
    """`posthoc --method laplace` with 2 processes == 1 on the same MAP adapter: every K-FAC factor the same
    matrix to 1e-5 relative (measured 2.5e-7: float summation order and batch padding), the same evidence and
    marglik prior precision (1e-5 relative; measured 4e-9), and the same probit predictions evaluated with 2
    processes and with 1 (1e-5; measured 4e-8). `train --method laplace` trains MAP and fits under 2 processes:
    its adapter differs from the one-process training's by float summation order (~2e-7), its factors and prior
    agree to 1e-4 (measured 3.5e-7 and 6e-8)."""
    run, task, args = map_run
    for n in (1, 2):
        uqlora("posthoc", run, "--method", "laplace", "--out", tmp_path / f"l{n}", "--quiet", processes=n)
        uqlora("evaluate", tmp_path / f"l{n}", "--task", task, "--quiet", processes=n)
    one, two = fit_summary(tmp_path / "l1"), fit_summary(tmp_path / "l2")
    assert one["processes"] == 1 and two["processes"] == 2 and one["train_questions"] == two["train_questions"] == 16
    assert one["low_rank_factors"] == two["low_rank_factors"] == 0
    for key in ("prior_precision", "log_marginal_likelihood"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert_same_full_factors(factors(tmp_path / "l1"), factors(tmp_path / "l2"), rtol=1e-5)
    torch.testing.assert_close(probs(tmp_path / "l2"), probs(tmp_path / "l1"), atol=1e-5, rtol=0)
    # the logit Gaussians both processes kept, gathered in question order; --link mc under 2 processes reads them
    kept = [load_file(tmp_path / f"l{n}" / "eval" / "jsonl-arith" / LOGIT_FILE) for n in (1, 2)]
    torch.testing.assert_close(kept[1]["mean"], kept[0]["mean"], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept[1]["cov"], kept[0]["cov"], atol=1e-5, rtol=1e-4)
    for n in (1, 2):
        uqlora("evaluate", tmp_path / f"l{n}", "--task", task, "--link", "mc", "--samples", "3", "--quiet",
               processes=n)
    mc = json.loads((tmp_path / "l2" / "eval" / "jsonl-arith@laplace-mc" / "metrics.json").read_text())
    assert mc["reused_logit_gaussians"] == 22
    torch.testing.assert_close(probs(tmp_path / "l2", "jsonl-arith@laplace-mc"),
                               probs(tmp_path / "l1", "jsonl-arith@laplace-mc"), atol=1e-4, rtol=0)

    uqlora("train", *args, "--method", "laplace", "--out", tmp_path / "t2", processes=2)
    trained = fit_summary(tmp_path / "t2")
    assert trained["processes"] == 2 and trained["prior_precision"] == pytest.approx(one["prior_precision"], rel=1e-4)
    assert_same_full_factors(factors(tmp_path / "l1"), factors(tmp_path / "t2"), rtol=1e-4)


def test_low_rank_laplace_two_processes(map_run, tmp_path):
    """--kfac-max-full-dim 8 --kfac-rank 16: the 64- and 32-wide sides are kept as rank-16 + diagonal.

    What "the same as one process" means there: one process streams its rows through the truncated SVD in one
    chain; two processes stream their halves and merge the two rank-16 summaries by one more truncation. The full
    sides, position counts and diagonals are sums, so they agree to float order (1e-5). The low-rank parts L = U
    diag(s) Uᵀ agree exactly only when the rows have rank <= 16; otherwise each is ⪯ the exact factor F and drops
    trace(F − L) = Σ residual, so ‖L₁ − L₂‖_* <= Σ residual₁ + Σ residual₂ (asserted, + float slack; measured at
    most 62 % of that bound); each dropped under 10 % of the trace here (measured <= 6.6 %), and the whole factors
    differ by < 5 % relative Frobenius (measured 2.3 %). The prior is chosen by --prior-fit val-nll on the 6
    validation questions, shared 3 + 3 and summed: the same grid value and validation NLLs to 1e-4 (measured
    2e-6)."""
    run, _, _ = map_run
    options = ["--kfac-max-full-dim", "8", "--kfac-rank", "16", "--prior-fit", "val-nll", "--quiet"]
    for n in (1, 2):
        uqlora("posthoc", run, "--method", "laplace", "--out", tmp_path / f"k{n}", *options, processes=n)
    one, two = fit_summary(tmp_path / "k1"), fit_summary(tmp_path / "k2")
    assert one["low_rank_factors"] == two["low_rank_factors"] == 8  # the A side of 4 lora_A, the G side of 4 lora_B
    assert two["prior_precision"] == one["prior_precision"]
    for prior, nll in one["validation_nll"].items():
        assert two["validation_nll"][prior] == pytest.approx(nll, abs=1e-4), prior
    f1, f2 = factors(tmp_path / "k1"), factors(tmp_path / "k2")
    assert_same_full_factors({k: f for k, f in f1.items() if f.is_full}, {k: f for k, f in f2.items() if f.is_full},
                             rtol=1e-5)
    for name in (k for k, f in f1.items() if not f.is_full):
        a, b = f1[name], f2[name]
        dense_a, dense_b = a.dense().double(), b.dense().double()
        trace = float(dense_a.trace())
        torch.testing.assert_close(dense_b.diagonal(), dense_a.diagonal(), rtol=1e-5, atol=1e-5 * trace / a.dim)
        low = [(f.eigvecs.double() * f.eigvals.double()) @ f.eigvecs.double().T for f in (a, b)]
        dropped = [float(f.residual.double().sum()) for f in (a, b)]
        assert max(dropped) < 0.1 * trace, name
        assert torch.linalg.matrix_norm(low[0] - low[1], ord="nuc") <= sum(dropped) + 1e-5 * trace, name
        assert torch.linalg.norm(dense_a - dense_b) < 0.05 * torch.linalg.norm(dense_a), name


def test_posthoc_failure_under_two_processes_leaves_nothing(map_run, tmp_path):
    """A fit that fails after --out was made and the run copied there (here: the run's task file is gone when the
    fit reads its training questions) fails in both processes with one error line and leaves no --out behind."""
    run, _, _ = map_run
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    config = broken / "config.yaml"
    config.write_text(config.read_text().replace("arith.jsonl", "gone.jsonl"))
    result = uqlora("posthoc", broken, "--method", "laplace", "--out", tmp_path / "out", "--quiet", processes=2,
                    ok=False)
    assert "error: " in result.stderr and "gone.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()


def test_temperature_two_processes_equal_one(map_run, tmp_path):
    """`posthoc --method temperature` with 2 processes == 1: predict_probs gathers every validation question's
    draws on both processes, both fit the same T, the main one writes it (NLLs before and after to 1e-6; T to 1e-3
    relative: the tiny model's predictions are near uniform, so its NLL is flat in T around the fitted T ~ 5, and
    the float32 rounding of the two layouts' batches (1e-7 in the NLL) moves the argmin by up to ~1e-4 relative;
    measured on an AVX2 EPYC: 5.34744 against 5.34771, NLL after equal to 3e-8)."""
    run, _, _ = map_run
    for n in (1, 2):
        uqlora("posthoc", run, "--method", "temperature", "--out", tmp_path / f"t{n}", "--quiet", processes=n)
    one, two = (fit_summary(tmp_path / f"t{n}", "temperature.json") for n in (1, 2))
    assert one["validation_questions"] == two["validation_questions"] == 6 and two["processes"] == 2
    assert two["temperature"] == pytest.approx(one["temperature"], rel=1e-3)
    for key in ("validation_nll_before", "validation_nll_after"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


@pytest.mark.parametrize("method, options", [("blob", ["--blob-kl-lr", "0"]), ("clora", ["--clora-kl-weight", "1e-2"])])
def test_variational_two_processes(method, options, tmp_path, tiny_model_dir):
    """BLoB (its KL in the AdamW objective, --blob-kl-lr 0; the default's separate KL step needs no reduction:
    every process takes the same step from the same weights) and C-LoRA under two processes: the KL enters the
    objective once, not once per process.

    Each process adds the KL share of its own questions (BLoB: π_i·KL/S per question; C-LoRA: β·KL of its own
    real tokens), and the reduced step loss is the one-process objective. Step 1 shows it exactly: LoRA B starts
    at 0, so the first forward is the base model's whatever the noise, and the logged loss (NLL + KL term; the KL
    term is made large: BLoB's is ~35 nats a question, C-LoRA's ~6 with β = 1e-2) equals one process's to 1e-5.
    Later steps are not compared: each process draws its weight noise from its own stream (the run's seed and the
    process), so two processes draw other noise than one (BLoB's trained adapters differ by ~2e-2). Evaluation at
    the posterior mean (--samples 0) is deterministic: 2 processes == 1 on the same run (1e-5), each question
    predicted once."""
    task = f"jsonl:{write_jsonl_task(tmp_path / 'arith.jsonl', 22)}"
    args = ["--model", tiny_model_dir, "--task", task, "--epochs", "1", "--batch-size", "4", "--lr", "5e-3",
            "--lora-dropout", "0", "--device", "cpu", "--framing", "cloze", "--quiet", "--method", method, *options]
    for n in (1, 2):
        uqlora("train", *args, "--out", tmp_path / f"p{n}", processes=n)
    first = [json.loads((tmp_path / f"p{n}" / "train_log.jsonl").read_text().splitlines()[0]) for n in (1, 2)]
    assert first[0]["step"] == first[1]["step"] == 1 and first[0]["loss"] > 1.5 * math.log(4)  # NLL ≈ log 4
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=1e-5)
    run = tmp_path / "p2"
    assert (run / "posterior" / f"{method}.safetensors").is_file()
    for n in (1, 2):
        uqlora("evaluate", run, "--task", task, "--samples", "0", "--quiet", processes=n)
        os.replace(run / "eval" / f"jsonl-arith@{method}-mean", run / "eval" / f"mean{n}")
    torch.testing.assert_close(probs(run, "mean2"), probs(run, "mean1"), atol=1e-5, rtol=0)
    lines = (run / "eval" / "mean2" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"q{i}" for i in range(22)]
