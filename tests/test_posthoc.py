"""`uqlora posthoc` (laplace, laplace-ll, temperature, swag-scale) and `train --method laplace` end to end on the
tiny model.

Oracles: a Laplace posterior with an enormous prior precision predicts exactly what MAP predicts (the covariance
vanishes); `train --method laplace` writes the same posterior as `train --method map` + `posthoc`; temperature
scaling of a MAP run equals softmax(log p_MAP / T) of the MAP run's own predictions. The numerics are tested
against brute force in test_kfac.py, test_laplace_oracle.py and test_glm_temperature.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import opts, probs_of
from uqlora.cli import main
from uqlora.config import TrainConfig
from uqlora.errors import UqloraError
from uqlora.evaluate import evaluate
from uqlora.posthoc.fit import posthoc, validation_questions
from uqlora.train import train


def config_for(model_dir, task_file, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), task=f"jsonl:{task_file}", max_examples=16, batch_size=4, lr=5e-3, lora_r=4,
                epochs=1, device="cpu", framing="cloze", seed=2)
    return TrainConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def map_run(tmp_path_factory, tiny_model_dir, task):
    run = train(config_for(tiny_model_dir, task), tmp_path_factory.mktemp("r") / "map", quiet=True)
    evaluate(run, opts(task))
    return run


@pytest.fixture(scope="module")
def laplace_run(tmp_path_factory, map_run):
    return posthoc(map_run, tmp_path_factory.mktemp("r") / "laplace", "laplace", {}, quiet=True)


def test_laplace_run_directory(laplace_run, map_run):
    """The posthoc run holds the MAP adapter, posterior/laplace.safetensors (a G and A factor per LoRA linear,
    the prior precision) and laplace.json; its config names the method and keeps the MAP run's settings."""
    state = load_file(laplace_run / "posterior" / "laplace.safetensors")
    summary = json.loads((laplace_run / "posterior" / "laplace.json").read_text())
    n_linears = 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert summary["linears"] == n_linears and summary["train_questions"] == 16
    assert summary["prior_precision"] > 0 and state["prior_precision"].item() == summary["prior_precision"]
    assert sum(k.endswith(".G.eigvals") for k in state) == n_linears
    assert (laplace_run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (map_run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_laplace_with_huge_prior_is_map(laplace_run, map_run, task, tmp_path):
    """Prior precision 1e12: the GLM covariance vanishes, probit gives MAP's probabilities (to 1e-5)."""
    run = tmp_path / "laplace-sharp"
    shutil.copytree(laplace_run, run)
    state = load_file(run / "posterior" / "laplace.safetensors")
    state["prior_precision"] = torch.tensor(1e12)
    save_file(state, run / "posterior" / "laplace.safetensors")
    evaluate(run, opts(task))
    torch.testing.assert_close(probs_of(run), probs_of(map_run), rtol=0, atol=1e-5)


def test_laplace_predictive_is_less_confident(laplace_run, map_run, task):
    """probit with the fitted prior: on average less confident than MAP (the variance shrinks the logit gaps);
    `--link mc` gives S draws with a positive mutual information in eval/TASK@laplace-mc, reproducible."""
    metrics = evaluate(laplace_run, opts(task))
    assert metrics["method"] == "laplace" and metrics["n_samples"] == 1
    assert probs_of(laplace_run).max(-1).values.mean() <= probs_of(map_run).max(-1).values.mean() + 1e-6
    mc = evaluate(laplace_run, opts(task, link="mc", samples=4, seed=1))
    first = probs_of(laplace_run, "jsonl-arith@laplace-mc")  # beside the probit results, not over them
    assert mc["n_samples"] == 4 and mc["mean_mutual_information"] > 0
    assert (laplace_run / "eval" / "jsonl-arith" / "metrics.json").is_file()
    evaluate(laplace_run, opts(task, link="mc", samples=4, seed=1))
    assert torch.equal(probs_of(laplace_run, "jsonl-arith@laplace-mc"), first)


def test_train_method_laplace_equals_map_then_posthoc(tmp_path, tiny_model_dir, task, laplace_run):
    """`train --method laplace` trains MAP and fits in place: the same posterior tensors as map + posthoc."""
    run = train(config_for(tiny_model_dir, task, method="laplace"), tmp_path / "lap", quiet=True)
    ours, theirs = load_file(run / "posterior" / "laplace.safetensors"), \
        load_file(laplace_run / "posterior" / "laplace.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


def test_last_layer_laplace_and_val_nll_prior(map_run, tmp_path, task):
    """laplace-ll keeps blocks of the deepest block only (layers.1); prior_fit val-nll picks a grid value and
    records the validation NLL of each; the validation questions are ones the run did not train on."""
    from uqlora.posthoc.fit import PRIOR_GRID, training_questions

    run = posthoc(map_run, tmp_path / "ll", "laplace-ll", {"prior_fit": "val-nll", "val_examples": 5}, quiet=True)
    state = load_file(run / "posterior" / "laplace-ll.safetensors")
    names = {k.rsplit(".", 2)[0] for k in state if k != "prior_precision"}
    assert len(names) == 4 and all(".layers.1." in n for n in names)
    summary = json.loads((run / "posterior" / "laplace-ll.json").read_text())
    assert summary["prior_precision"] in PRIOR_GRID and len(summary["validation_nll"]) == len(PRIOR_GRID)
    config = TrainConfig(**{**json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))})
    trained = {q.id for q in training_questions(config)[0]}
    assert len(validation_questions(config)) == 5 and not trained & {q.id for q in validation_questions(config)}
    assert evaluate(run, opts(task))["method"] == "laplace-ll"


def test_temperature_on_map_is_softmax_of_scaled_log_probs(map_run, tmp_path, task):
    """T fitted on validation questions; the predictive equals softmax(log p_MAP / T) of MAP's predictions."""
    run = posthoc(map_run, tmp_path / "temp", "temperature", {"val_examples": 8}, quiet=True)
    fitted = json.loads((run / "posterior" / "temperature.json").read_text())
    assert fitted["temperature"] > 0 and fitted["validation_nll_after"] <= fitted["validation_nll_before"] + 1e-9
    evaluate(run, opts(task))
    expected = torch.softmax(probs_of(map_run).log() / fitted["temperature"], -1)
    torch.testing.assert_close(probs_of(run), expected, rtol=1e-4, atol=1e-6)


def test_temperature_composes_with_laplace(laplace_run, tmp_path, task):
    """Temperature on a Laplace run: base_method laplace, its posterior copied and used."""
    run = posthoc(laplace_run, tmp_path / "lt", "temperature", {"val_examples": 6}, quiet=True)
    assert (run / "posterior" / "laplace.safetensors").is_file()
    assert evaluate(run, opts(task))["method"] == "temperature"


def test_posthoc_refusals(map_run, laplace_run, tmp_path, task, capsys):
    """Bad input: laplace on a laplace run, an existing --out, --link on a MAP run, a posterior of another
    adapter (a block renamed), a temperature run without its temperature.json: one clear error each."""
    with pytest.raises(UqloraError, match="point-estimate adapter"):
        posthoc(laplace_run, tmp_path / "x", "laplace", {})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(UqloraError, match="not empty"):
        posthoc(map_run, tmp_path / "full", "laplace", {})
    with pytest.raises(UqloraError, match="--link"):
        evaluate(map_run, opts(task, link="mc"))
    bad = tmp_path / "bad"
    shutil.copytree(laplace_run, bad)
    state = load_file(bad / "posterior" / "laplace.safetensors")
    key = next(k for k in state if k.endswith(".A.eigvals"))
    state[key.replace("layers.0", "layers.7")] = state.pop(key)
    save_file(state, bad / "posterior" / "laplace.safetensors")
    with pytest.raises(UqloraError, match="does not match the run's adapter"):
        evaluate(bad, opts(task))
    assert main(["posthoc", str(map_run), "--method", "temperature", "--out", str(tmp_path / "t"),
                 "--val-examples", "0", "--quiet"]) == 2
    assert "val_examples" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_low_rank_factors_match_full_at_full_rank(map_run, laplace_run, tmp_path, task):
    """--kfac-max-full-dim 32 keeps the 64-wide sides of the tiny model as low rank + diagonal: at rank 64 (= the
    side) that is exact, so the predictive equals the all-full fit's (to 1e-4); at rank 4 it is smaller and
    still a valid predictive."""
    evaluate(laplace_run, opts(task))
    full_probs = probs_of(laplace_run)
    exact = posthoc(map_run, tmp_path / "lr64", "laplace", {"kfac_max_full_dim": 32, "kfac_rank": 64}, quiet=True)
    small = posthoc(map_run, tmp_path / "lr4", "laplace", {"kfac_max_full_dim": 32, "kfac_rank": 4}, quiet=True)
    summaries = [json.loads((r / "posterior" / "laplace.json").read_text()) for r in (laplace_run, exact, small)]
    assert summaries[0]["low_rank_factors"] == 0 and summaries[1]["low_rank_factors"] > 0
    assert summaries[2]["factor_bytes"] < summaries[0]["factor_bytes"]
    evaluate(exact, opts(task))
    evaluate(small, opts(task))
    torch.testing.assert_close(probs_of(exact), full_probs, rtol=0, atol=1e-4)
    assert torch.allclose(probs_of(small).sum(-1), torch.ones(len(full_probs)))


def test_swag_scale_picks_the_lowest_validation_nll(tmp_path, tiny_model_dir, task, map_run, capsys):
    """`posthoc --method swag-scale` on a swag run: it tries SCALE_GRID and beyond an end while the best is there;
    its recorded validation NLLs equal the NLL of the swag predictive on the same validation questions evaluated
    at each scale directly (the run's config swag_scale overridden, as `evaluate --swag-scale` does), the scale is
    their argmin, and evaluating the fitted run gives exactly the swag run's predictions at that scale;
    `train --method swag-scale` (SWAG, then the fit) gives the same fit and predictions. --swag-scale on the
    fitted run, a non-swag run, or a fitted run without its swag-scale.json is refused."""
    from uqlora.evaluate import open_run
    from uqlora.posthoc.fit import SCALE_GRID, SCALE_LIMITS, SCALE_STEP
    from uqlora.predict import predict_probs
    from uqlora.runs import read_config

    swag = train(config_for(tiny_model_dir, task, method="swag", epochs=2, swag_start=0.5, swag_every=1,
                            swag_rank=3, swa_lr=2e-3), tmp_path / "swag", quiet=True)
    run = posthoc(swag, tmp_path / "scaled", "swag-scale", {}, quiet=True)
    fitted = json.loads((run / "posterior" / "swag-scale.json").read_text())
    config = TrainConfig(**read_config(run))
    val_qs = validation_questions(config)
    assert fitted["validation_questions"] == len(val_qs) == 8 and fitted["draws"] == 10
    labels = torch.tensor([q.label for q in val_qs])
    recorded = {scale: value for scale, value in fitted["validation_nll"]}
    assert set(SCALE_GRID) <= set(recorded)
    best = fitted["scale"]  # an end of the tried scales only where the next one would leave SCALE_LIMITS
    assert best != max(recorded) or best * SCALE_STEP > SCALE_LIMITS[1]
    assert best != min(recorded) or best / SCALE_STEP < SCALE_LIMITS[0]
    direct = {}
    for scale in recorded:
        method, model, tok, framing, acc = open_run(swag, read_config(swag), "swag", {"swag_scale": scale},
                                                    quiet=True)
        probs = predict_probs(method, model, tok, framing, val_qs, accelerator=acc, batch_size=4, max_length=512,
                              n_samples=10, quiet=True).probs
        direct[scale] = float(-probs[torch.arange(8), labels].double().log().mean())
        assert recorded[scale] == pytest.approx(direct[scale], abs=1e-5)
    assert fitted["scale"] == min(direct, key=direct.get)
    assert len(set(round(v, 4) for v in direct.values())) > 1  # the scales do change the predictive

    metrics = evaluate(run, opts(task))
    assert metrics["method"] == "swag-scale"
    evaluate(swag, opts(task, swag_scale=fitted["scale"]))
    assert torch.equal(probs_of(run), probs_of(swag))

    trained = train(config_for(tiny_model_dir, task, method="swag-scale", epochs=2, swag_start=0.5, swag_every=1,
                               swag_rank=3, swa_lr=2e-3), tmp_path / "trained", quiet=True)  # SWAG, then the fit
    assert json.loads((trained / "posterior" / "swag-scale.json").read_text())["validation_nll"] == \
        fitted["validation_nll"]
    evaluate(trained, opts(task))
    assert torch.equal(probs_of(trained), probs_of(run))
    with pytest.raises(UqloraError, match="was fitted"):
        evaluate(run, opts(task, swag_scale=2.0))
    with pytest.raises(UqloraError, match="swag-scale chooses the scale of a swag run"):
        posthoc(map_run, tmp_path / "x", "swag-scale", {})
    (run / "posterior" / "swag-scale.json").unlink()
    assert main(["evaluate", str(run), "--task", f"jsonl:{task}", "--quiet"]) == 2
    assert "no fitted SWAG scale" in capsys.readouterr().err
