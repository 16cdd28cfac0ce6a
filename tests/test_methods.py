"""SWA, SWAG, MultiSWAG, deep ensembles and MC dropout end to end on the tiny random-init model.

Oracles: a SWAG run at scale 0 against the SWA run of the same trajectory; an ensemble's predictive against the
mean of its members' own evaluations; member m against a standalone MAP run with seed + m; resumed runs against
uninterrupted ones. The SWAG numerics themselves are tested against direct computations in test_swag_moments.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import Interrupt, opts, predictions, probs_of, stop_at
from uqlora.cli import main
from uqlora.config import TrainConfig
from uqlora.errors import UqloraError
from uqlora.evaluate import evaluate
from uqlora.train import train

# 24 questions, batch 4, 2 epochs = 12 steps; collection after step 6, every step: 6 snapshots, rank 3 wraps.
SWAG = dict(epochs=2, swag_start=0.5, swag_every=1, swag_rank=3, swa_lr=2e-3, lora_dropout=0.1, seed=3)


def config_for(model_dir, task_file, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), task=f"jsonl:{task_file}", batch_size=4, lr=5e-3, lora_r=4, device="cpu",
                framing="cloze")
    return TrainConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def swag_run(tmp_path_factory, tiny_model_dir, task):
    return train(config_for(tiny_model_dir, task, method="swag", **SWAG), tmp_path_factory.mktemp("r") / "swag",
                 quiet=True)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, tiny_model_dir, task):
    cfg = config_for(tiny_model_dir, task, method="ensemble", members=2, epochs=1, lora_dropout=0.1, seed=3)
    return train(cfg, tmp_path_factory.mktemp("r") / "ensemble", quiet=True)


def test_swag_run_directory(swag_run):
    """posterior/swag.safetensors holds (K+2)*P floats; the adapter is the SWA mean; the SWA lr is logged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from uqlora.methods.swag import flatten, lora_parameters

    state = load_file(swag_run / "posterior" / "swag.safetensors")
    P = state["mean"].numel()
    assert state["n_collected"].item() == 6 and state["deviations"].shape == (3, P) and state["sq_mean"].shape == (P,)
    base = AutoModelForCausalLM.from_pretrained(yaml.safe_load((swag_run / "config.yaml").read_text())["model"])
    model = PeftModel.from_pretrained(base, swag_run / "adapter")
    assert torch.equal(flatten(lora_parameters(model)), state["mean"])
    log = [json.loads(line) for line in (swag_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if r["step"] > 6] == [2e-3] * 6 and log[5]["lr"] != 2e-3


def test_swag_scale_zero_equals_swa(tmp_path, swag_run, tiny_model_dir, task):
    """SWA collects the same trajectory: identical adapter, and SWAG at scale 0 predicts exactly like it."""
    swa = train(config_for(tiny_model_dir, task, method="swa", **SWAG), tmp_path / "swa", quiet=True)
    assert not (swa / "posterior").exists()
    for key, value in load_file(swa / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(value, load_file(swag_run / "adapter" / "adapter_model.safetensors")[key])
    evaluate(swa, opts(task))
    metrics = evaluate(swag_run, opts(task, samples=2, swag_scale=0.0))
    assert metrics["n_samples"] == 2 and metrics["mean_mutual_information"] == pytest.approx(0, abs=1e-9)
    torch.testing.assert_close(probs_of(swag_run), probs_of(swa), atol=1e-6, rtol=0)
    evaluate(swag_run, opts(task, method="swa"))  # the SWAG run's own adapter, deterministic
    torch.testing.assert_close(probs_of(swag_run, "jsonl-arith@swa"), probs_of(swa), atol=1e-6, rtol=0)


def test_swag_draws_are_seeded_and_carry_mutual_information(swag_run, task):
    """Same --seed, same predictions; another seed, other draws; predictions.jsonl has entropy and MI."""
    evaluate(swag_run, opts(task, samples=3, seed=0))
    first = predictions(swag_run)
    evaluate(swag_run, opts(task, samples=3, seed=0))
    assert predictions(swag_run) == first
    assert all(p["mutual_information"] >= 0 and p["entropy"] > 0 for p in first)
    assert any(p["mutual_information"] > 0 for p in first)
    evaluate(swag_run, opts(task, samples=3, seed=1))
    assert not torch.equal(probs_of(swag_run), torch.tensor([p["probs"] for p in first]))


def test_swag_samples_in_place_and_restores_the_mean(swag_run, tiny_model_dir, task):
    """Each draw is written into the LoRA weights themselves (same storage, no model copy); the mean comes back."""
    from uqlora.data import load_questions
    from uqlora.evaluate import _load_adapters
    from uqlora.methods import get_method
    from uqlora.methods.swag import flatten
    from uqlora.models import load_model
    from uqlora.runs import read_config

    config = read_config(swag_run)
    method = get_method("swag", config_for(tiny_model_dir, task, method="swag", **SWAG))
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    model, adapters = _load_adapters(method, model, swag_run, config)
    method.bind(model, adapters, seed=0)
    pointers = [p.data_ptr() for p in method.params]
    seen = []

    def score_fn(qs):
        seen.append(flatten(method.params).clone())
        return torch.zeros(len(qs), 4)

    method.predict(score_fn, load_questions(f"jsonl:{task}", "test")[:2], 3)
    mean = method.moments.mean
    assert len(seen) == 3 and all(not torch.equal(s, mean) for s in seen) and not torch.equal(seen[0], seen[1])
    assert torch.equal(flatten(method.params), mean)
    assert [p.data_ptr() for p in method.params] == pointers


def test_swag_resume_matches_uninterrupted(tmp_path, swag_run, tiny_model_dir, task):
    """Checkpoint at step 8 (two snapshots in), interrupted at 9, resumed: the same moments and adapter."""
    cfg = config_for(tiny_model_dir, task, method="swag", save_every=4, **SWAG)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", quiet=True, step_hook=stop_at(9))
    assert (tmp_path / "run" / "checkpoint" / "method.safetensors").is_file()
    train(cfg, tmp_path / "run", resume=True, quiet=True)
    for name in ("posterior/swag.safetensors", "adapter/adapter_model.safetensors"):
        resumed, whole = load_file(tmp_path / "run" / name), load_file(swag_run / name)
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_swag_refuses_a_window_without_snapshots(tmp_path, tiny_model_dir, task):
    """swag_every beyond the collection window: one clear error before training, nothing written."""
    cfg = config_for(tiny_model_dir, task, method="swag", **{**SWAG, "swag_every": 50})
    with pytest.raises(UqloraError, match="no snapshot would be collected"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tamper", ["shifted mean", "other size"])
def test_posterior_of_another_adapter_is_refused(tmp_path, swag_run, task, tamper):
    """A posterior whose mean is not the run's adapter (another run's, or another model's size) is refused."""
    run = tmp_path / "run"
    shutil.copytree(swag_run, run, ignore=shutil.ignore_patterns("eval"))
    state = load_file(run / "posterior" / "swag.safetensors")
    if tamper == "shifted mean":
        state["mean"] = state["mean"] + 0.5
    else:
        state = {"mean": state["mean"][:-4].contiguous(), "sq_mean": state["sq_mean"][:-4].contiguous(),
                 "deviations": state["deviations"][:, :-4].contiguous(), "n_collected": state["n_collected"],
                 "rank": state["rank"]}
    save_file(state, run / "posterior" / "swag.safetensors")
    with pytest.raises(UqloraError, match="does not match the run's adapter"):
        evaluate(run, opts(task))


def test_ensemble_members_are_standalone_map_runs(tmp_path, ensemble_run, tiny_model_dir, task):
    """Member m is exactly `train --method map --seed seed+m`; the ensemble predictive is the mean of the
    members' probabilities (not logits), each member once."""
    single = train(config_for(tiny_model_dir, task, epochs=1, lora_dropout=0.1, seed=4), tmp_path / "map4", quiet=True)
    member1 = load_file(ensemble_run / "members" / "1" / "adapter" / "adapter_model.safetensors")
    member0 = load_file(ensemble_run / "members" / "0" / "adapter" / "adapter_model.safetensors")
    standalone = load_file(single / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(member1[k], standalone[k]) for k in standalone)
    assert any(not torch.equal(member0[k], member1[k]) for k in member0)

    metrics = evaluate(ensemble_run, opts(task))
    assert metrics["n_samples"] == 2
    members = []
    for m in (0, 1):
        evaluate(ensemble_run / "members" / str(m), opts(task))
        members.append(probs_of(ensemble_run / "members" / str(m)))
    torch.testing.assert_close(probs_of(ensemble_run), (members[0] + members[1]) / 2, atol=1e-6, rtol=0)
    assert all("mutual_information" in p for p in predictions(ensemble_run))


def test_ensemble_resume_keeps_finished_members(tmp_path, ensemble_run, tiny_model_dir, task):
    """Interrupted inside member 1, resumed: member 0 is kept as it was, member 1 continues; both equal the
    uninterrupted ensemble's."""
    cfg = config_for(tiny_model_dir, task, method="ensemble", members=2, epochs=1, lora_dropout=0.1, seed=3,
                     save_every=2)
    calls = []

    def hook(step):
        calls.append(step)
        if len(calls) == 6 + 4:  # member 0 has 6 steps; stop after member 1's step 4 (checkpoint at 4)
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", quiet=True, step_hook=hook)
    first = (tmp_path / "run" / "members" / "0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    train(cfg, tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "members" / "0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == first
    for m in ("0", "1"):
        name = f"members/{m}/adapter/adapter_model.safetensors"
        resumed, whole = load_file(tmp_path / "run" / name), load_file(ensemble_run / name)
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_multiswag_mixes_members_samples(tmp_path, tiny_model_dir, task):
    """M=2 members x S=2 draws = 4; at scale 0 the mixture is the mean of the members' SWA predictives."""
    cfg = config_for(tiny_model_dir, task, method="multiswag", members=2, **SWAG)
    run = train(cfg, tmp_path / "multi", quiet=True)
    assert (run / "members" / "1" / "posterior" / "swag.safetensors").is_file()
    assert evaluate(run, opts(task, samples=2))["n_samples"] == 4
    evaluate(run, opts(task, samples=2, swag_scale=0.0))
    members = []
    for m in (0, 1):
        evaluate(run / "members" / str(m), opts(task, samples=1, swag_scale=0.0))
        members.append(probs_of(run / "members" / str(m)))
    torch.testing.assert_close(probs_of(run), (members[0] + members[1]) / 2, atol=1e-6, rtol=0)


def test_mc_dropout_samples_only_the_lora_dropout(tmp_path, ensemble_run, tiny_model_dir, task):
    """During prediction the LoRA dropout layers, and nothing else, are in training mode; draws differ; the
    same --seed gives the same predictive; `--method mc-dropout` on a map run writes eval/TASK@mc-dropout."""
    from uqlora.data import load_questions
    from uqlora.evaluate import _load_adapters
    from uqlora.evaluation.compare import collect_rows
    from uqlora.methods import get_method
    from uqlora.models import load_model

    run = tmp_path / "map"
    shutil.copytree(ensemble_run / "members" / "0", run, ignore=shutil.ignore_patterns("eval"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    method = get_method("mc-dropout", config_for(tiny_model_dir, task, method="mc-dropout", lora_dropout=0.1))
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    model, adapters = _load_adapters(get_method("map"), model, run, config)
    method.bind(model, adapters)
    training = []

    def score_fn(qs):
        training.append(sorted(n for n, m in model.named_modules() if m.training))
        return torch.randn(len(qs), 4)

    method.predict(score_fn, load_questions(f"jsonl:{task}", "test")[:2], 2)
    assert training[0] and all("lora_dropout" in n for n in training[0])
    assert not any(m.training for m in model.modules())

    metrics = evaluate(run, opts(task, samples=3, method="mc-dropout"))
    first = probs_of(run, "jsonl-arith@mc-dropout")
    assert metrics["n_samples"] == 3 and metrics["mean_mutual_information"] > 0
    evaluate(run, opts(task, samples=3, method="mc-dropout"))
    assert torch.equal(probs_of(run, "jsonl-arith@mc-dropout"), first)
    evaluate(run, opts(task))
    rows = collect_rows([run])
    assert [(r["method"], r["task"]) for r in rows] == [("map", "jsonl-arith"), ("mc-dropout", "jsonl-arith")]


def test_method_errors(tmp_path, ensemble_run, tiny_model_dir, task, capsys):
    """mc-dropout without dropout, --samples on a deterministic method, an incomplete ensemble: one line each."""
    with pytest.raises(UqloraError, match="lora_dropout is 0"):
        config_for(tiny_model_dir, task, method="mc-dropout", lora_dropout=0.0)
    assert main(["evaluate", str(ensemble_run / "members" / "0"), "--task", f"jsonl:{task}", "--samples", "3"]) == 2
    assert "deterministic predictive" in capsys.readouterr().err
    assert main(["evaluate", str(ensemble_run), "--task", f"jsonl:{task}", "--method", "swag"]) == 2
    assert "does not give that predictive" in capsys.readouterr().err
    broken = tmp_path / "ens"
    shutil.copytree(ensemble_run, broken, ignore=shutil.ignore_patterns("eval"))
    shutil.rmtree(broken / "members" / "1" / "adapter")
    assert main(["evaluate", str(broken), "--task", f"jsonl:{task}", "--quiet"]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not (broken / "eval").exists()


def test_cli_swag_flags(swag_run, task, capsys):
    """`uqlora evaluate --samples --seed --swag-scale` reach the predictive (S recorded, scale 0 gives MI 0)."""
    assert main(["evaluate", str(swag_run), "--task", f"jsonl:{task}", "--samples", "2", "--seed", "7",
                 "--swag-scale", "0", "--quiet"]) == 0
    saved = json.loads((swag_run / "eval" / "jsonl-arith" / "metrics.json").read_text())
    assert saved["n_samples"] == 2 and saved["mean_mutual_information"] == pytest.approx(0, abs=1e-9)


def test_combine_map_runs_equals_trained_ensemble(tmp_path, ensemble_run, tiny_model_dir, task, capsys):
    """`uqlora combine` of map runs with seeds 3 and 4 is the ensemble `train --method ensemble --seed 3
    --members 2` trains: the same config.yaml and bit-identical predictions; a run whose config.yaml predates a
    setting combines at its default; runs with other settings, a gap in the seeds or a non-map/swag run are refused without writing anything."""
    runs_ = [train(config_for(tiny_model_dir, task, epochs=1, lora_dropout=0.1, seed=s), tmp_path / f"map{s}",
                   quiet=True) for s in (4, 3)]
    assert main(["combine", str(runs_[0]), str(runs_[1]), "--out", str(tmp_path / "ens")]) == 0
    ours, trained = yaml.safe_load((tmp_path / "ens" / "config.yaml").read_text()), \
        yaml.safe_load((ensemble_run / "config.yaml").read_text())
    assert ours == trained
    evaluate(tmp_path / "ens", opts(task))
    evaluate(ensemble_run, opts(task))
    assert torch.equal(probs_of(tmp_path / "ens"), probs_of(ensemble_run))

    # a run made before a setting existed (its config.yaml lacks it) combines with a newer one at its default
    older = tmp_path / "older4"
    shutil.copytree(runs_[0], older, ignore=shutil.ignore_patterns("eval"))
    saved = yaml.safe_load((older / "config.yaml").read_text())
    del saved["blob_kl_lr"]
    (older / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["combine", str(older), str(runs_[1]), "--out", str(tmp_path / "ens-older")]) == 0

    other = train(config_for(tiny_model_dir, task, epochs=1, lora_dropout=0.1, seed=5, lr=1e-3), tmp_path / "map5",
                  quiet=True)
    capsys.readouterr()
    for argv, message in (([runs_[1], other], "differs"), ([runs_[1], tmp_path / "ens"], "--method ensemble")):
        assert main(["combine", *map(str, argv), "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    gap = train(config_for(tiny_model_dir, task, epochs=1, lora_dropout=0.1, seed=6), tmp_path / "map6", quiet=True)
    assert main(["combine", str(runs_[1]), str(gap), "--out", str(tmp_path / "bad")]) == 2
    assert "seeds [3, 6]" in capsys.readouterr().err
