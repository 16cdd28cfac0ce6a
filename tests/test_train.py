"""Train -> evaluate round trips on the tiny random-init model: run directory, plain-PEFT reload, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import Interrupt, stop_at
from uqlora.config import TrainConfig
from uqlora.evaluate import EvalOptions, evaluate
from uqlora.train import train


def config_for(model_dir, task_file, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), task=f"jsonl:{task_file}", epochs=2, batch_size=4, lr=5e-3,
                lora_r=4, lora_dropout=0.0, device="cpu", framing="cloze")
    return TrainConfig(**{**base, **kw}).validate()


def test_train_evaluate_round_trip(tmp_path, tiny_model_dir, task_file):
    """The run directory of DESIGN.md is complete and consistent; metrics recompute from the predictions."""
    run = train(config_for(tiny_model_dir, task_file), tmp_path / "run", quiet=True)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "checkpoint").exists()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # 24 questions / 4 per step × 2 epochs
    assert all({"step", "epoch", "loss", "lr"} <= set(r) for r in log)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 12 and len(summary["epoch_seconds"]) == 2

    metrics = evaluate(run, EvalOptions(task=f"jsonl:{task_file}", split="test", quiet=True, n_bins=10))
    out = run / "eval" / "jsonl-arith"
    saved = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "ece", "rms_ce", "nll", "brier", "n", "n_bins", "n_samples"} <= set(saved)
    assert saved["n"] == 24 and saved["n_bins"] == 10 and saved["n_samples"] == 1
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"q{i}" for i in range(24)]
    probs = torch.tensor([p["probs"] for p in preds])
    labels = torch.tensor([p["label"] for p in preds])
    assert metrics["accuracy"] == pytest.approx((probs.argmax(1) == labels).float().mean().item())
    assert metrics["nll"] == pytest.approx(-probs[torch.arange(24), labels].log().mean().item(), rel=1e-5)
    assert (out / "reliability.png").stat().st_size > 1000


def test_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, task_file):
    """`PeftModel.from_pretrained` alone reproduces the evaluated probabilities from the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uqlora.data import load_questions
    from uqlora.framing import cloze_scores

    run = train(config_for(tiny_model_dir, task_file, epochs=1), tmp_path / "run", quiet=True)
    evaluate(run, EvalOptions(task=f"jsonl:{task_file}", quiet=True))
    preds = [json.loads(line) for line in (run / "eval" / "jsonl-arith" / "predictions.jsonl").read_text().splitlines()]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = load_questions(f"jsonl:{task_file}", "test")
    with torch.no_grad():
        probs = torch.softmax(cloze_scores(model, tokenizer, questions), -1)
    torch.testing.assert_close(probs, torch.tensor([p["probs"] for p in preds]), atol=1e-5, rtol=0)
    lora_b = [v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # training moved the adapter off its zero init


def test_resume_matches_uninterrupted(tmp_path, tiny_model_dir, task_file):
    """Interrupted after step 4 (checkpoint every 3 steps, mid-epoch), resumed: the same final adapter and log
    as an uninterrupted run, with dropout on so the restored RNG state matters."""
    cfg = config_for(tiny_model_dir, task_file, epochs=2, save_every=3, lora_dropout=0.1, seed=5)
    whole = train(cfg, tmp_path / "whole", quiet=True)


    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", quiet=True, step_hook=stop_at(4))
    assert (tmp_path / "cut" / "checkpoint").is_dir() and not (tmp_path / "cut" / "adapter").exists()
    resumed = train(cfg, tmp_path / "cut", resume=True, quiet=True)

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "train_log.jsonl").read_text() == (resumed / "train_log.jsonl").read_text()
    # the checkpoint carried the time already spent: the resumed run reports both epochs, the cut one in full
    seconds = json.loads((resumed / "train_summary.json").read_text())["epoch_seconds"]
    assert len(seconds) == 2 and all(t > 0 for t in seconds)


def test_held_out_slice_selects_best_epoch(tmp_path, tiny_model_dir, task_file):
    """With val_fraction, each epoch logs held-out NLL and the saved adapter is the best epoch's."""
    run = train(config_for(tiny_model_dir, task_file, epochs=3, val_fraction=0.25), tmp_path / "run", quiet=True)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_nll" in r]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    summary = json.loads((run / "train_summary.json").read_text())
    best = min(val, key=lambda r: r["val_nll"])["epoch"]
    assert summary["best_epoch"] == best and summary["held_out_questions"] == 6


def test_bf16_on_the_cpu_trains_fp32_adapters_close_to_fp32(tmp_path, tiny_model_dir, task_file):
    """--dtype bfloat16 on the CPU: bf16 base weights with eager attention (models._attention), fp32 LoRA weights
    (PEFT keeps adapters in fp32); its predictions stay within bf16 rounding of the fp32 run's (0.005; measured
    6e-4)."""
    from uqlora.models import load_model

    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu", quiet=True)
    assert model.config._attn_implementation == "eager" and next(model.parameters()).dtype == torch.bfloat16
    runs = {d: train(config_for(tiny_model_dir, task_file, dtype=d, seed=1), tmp_path / d, quiet=True)
            for d in ("float32", "bfloat16")}
    assert {t.dtype for t in load_file(runs["bfloat16"] / "adapter" / "adapter_model.safetensors").values()} \
        == {torch.float32}
    probs = {}
    for d, run in runs.items():
        evaluate(run, EvalOptions(task=f"jsonl:{task_file}", split="test", quiet=True))
        lines = (run / "eval" / "jsonl-arith" / "predictions.jsonl").read_text().splitlines()
        probs[d] = torch.tensor([json.loads(line)["probs"] for line in lines])
    torch.testing.assert_close(probs["bfloat16"], probs["float32"], rtol=0, atol=0.005)
