"""The Laplace evaluation keeps its GLM logit Gaussians (posthoc/logit_store.py) so that the other link is free.

Oracle: a fresh copy of the same run, evaluated with that link from scratch. Reading the Gaussians back must give
exactly its probabilities, with no Jacobian computed; a posterior that changed, a question set that grew, or another
batch size must not change any result. The task mixes 3-, 4- and 5-choice questions, so batches are padded.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import uqlora.methods.laplace
from conftest import opts, predictions
from uqlora.config import TrainConfig
from uqlora.errors import UqloraError
from uqlora.evaluate import evaluate
from uqlora.posthoc.fit import posthoc
from uqlora.posthoc.logit_store import FILE
from uqlora.train import train

pytestmark = pytest.mark.usefixtures("single_thread")
EVAL = "jsonl-mixed"


def write_mixed(path, n: int):
    """n arithmetic questions with 3, 4 or 5 choices (the first n of one fixed list)."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        choices = [str(a + b + d) for d in (-2, -1, 0, 1, 2)][: 3 + i % 3]
        rows.append({"id": f"m{i}", "question": f"What is {a} plus {b}?", "choices": choices,
                     "answer": choices.index(str(a + b))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mixed_task(tmp_path_factory):
    return write_mixed(tmp_path_factory.mktemp("task") / "mixed.jsonl", 20)


@pytest.fixture(scope="module")
def laplace_run(tmp_path_factory, tiny_model_dir, mixed_task):
    config = TrainConfig(model=str(tiny_model_dir), task=f"jsonl:{mixed_task}", max_examples=16, batch_size=4,
                         lr=5e-3, lora_r=4, epochs=1, device="cpu", framing="cloze", seed=3).validate()
    root = tmp_path_factory.mktemp("r")
    return posthoc(train(config, root / "map", quiet=True), root / "laplace", "laplace", {}, quiet=True)


def fresh(run, tmp_path, name="fresh"):
    """A copy of the run without any evaluation."""
    copy = tmp_path / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    return copy


def probs_of(run, name: str) -> torch.Tensor:
    """[N, 5] predicted probabilities, 0 for the choices a question does not have."""
    return torch.tensor([row["probs"] + [0.0] * (5 - len(row["probs"])) for row in predictions(run, name)])


def no_jacobians_error(*args, **kwargs):
    raise AssertionError("the Jacobians were computed although the saved Gaussians cover every question")


def test_mc_after_probit_reads_the_gaussians(laplace_run, mixed_task, tmp_path, monkeypatch):
    """probit saves [N, C_max] means and [N, C_max, C_max] covariances; `--link mc` then computes no Jacobian and
    gives exactly the mc probabilities of a fresh run (which also saves its own); probit after mc likewise."""
    run = fresh(laplace_run, tmp_path, "run")
    probit = evaluate(run, opts(mixed_task, batch_size=3))
    saved = load_file(run / "eval" / EVAL / FILE)
    assert probit["reused_logit_gaussians"] == 0
    assert saved["mean"].shape == (20, 5) and saved["cov"].shape == (20, 5, 5)
    assert torch.isinf(saved["mean"][0, 3:]).all() and torch.isfinite(saved["mean"][2]).all()  # 3 and 5 choices

    reference = fresh(laplace_run, tmp_path)
    evaluate(reference, opts(mixed_task, link="mc", samples=6, seed=4, batch_size=3))
    with monkeypatch.context() as patch:
        patch.setattr(uqlora.methods.laplace, "batch_logit_jacobians", no_jacobians_error)
        mc = evaluate(run, opts(mixed_task, link="mc", samples=6, seed=4, batch_size=3))
    assert mc["reused_logit_gaussians"] == 20 and mc["n_samples"] == 6
    # what the reused Gaussians had cost is recorded (the cost table counts it as if they had been computed)
    assert mc["reused_logit_gaussian_seconds"] == pytest.approx(probit["seconds"], abs=0.02)
    assert torch.equal(probs_of(run, f"{EVAL}@laplace-mc"), probs_of(reference, f"{EVAL}@laplace-mc"))

    with monkeypatch.context() as patch:  # the reverse: probit from the mc evaluation's file
        patch.setattr(uqlora.methods.laplace, "batch_logit_jacobians", no_jacobians_error)
        again = evaluate(reference, opts(mixed_task, batch_size=3))
    assert again["reused_logit_gaussians"] == 20
    assert torch.equal(probs_of(reference, EVAL), probs_of(run, EVAL))


def test_mc_draws_do_not_depend_on_the_batch(laplace_run, mixed_task, tmp_path):
    """A question's mc draws come from its id and its own choices: batch sizes 1 and 7 (other paddings) agree."""
    one, seven = fresh(laplace_run, tmp_path, "one"), fresh(laplace_run, tmp_path, "seven")
    evaluate(one, opts(mixed_task, link="mc", samples=5, batch_size=1))
    evaluate(seven, opts(mixed_task, link="mc", samples=5, batch_size=7))
    torch.testing.assert_close(probs_of(one, f"{EVAL}@laplace-mc"), probs_of(seven, f"{EVAL}@laplace-mc"),
                               rtol=0, atol=1e-5)


def test_another_posterior_or_more_questions_recompute(laplace_run, mixed_task, tmp_path):
    """Four questions more than were saved: only their batch is computed, and the result equals a fresh
    evaluation; Gaussians saved from another posterior file are not used."""
    run = fresh(laplace_run, tmp_path, "run")
    evaluate(run, opts(mixed_task, batch_size=4))
    grown_task = write_mixed(tmp_path / "grown" / "mixed.jsonl", 24)  # the same 20 questions, then 4 more
    grown = evaluate(run, opts(grown_task, link="mc", samples=3, batch_size=4))
    assert grown["reused_logit_gaussians"] == 20
    reference = fresh(laplace_run, tmp_path)
    evaluate(reference, opts(grown_task, link="mc", samples=3, batch_size=4))
    assert torch.equal(probs_of(run, f"{EVAL}@laplace-mc"), probs_of(reference, f"{EVAL}@laplace-mc"))

    evaluate(run, opts(mixed_task, batch_size=4))
    before = probs_of(run, EVAL)
    posterior = run / "posterior" / "laplace.safetensors"
    state = load_file(posterior)
    state["prior_precision"] = state["prior_precision"] / 100  # a wider posterior
    save_file(state, posterior)
    wider = evaluate(run, opts(mixed_task, batch_size=4))
    assert wider["reused_logit_gaussians"] == 0
    assert probs_of(run, EVAL).max(-1).values.mean() < before.max(-1).values.mean()


def test_corrupt_file_is_one_clear_error(laplace_run, mixed_task, tmp_path):
    """A damaged logit_gaussians.safetensors: one error naming the file and how to recover; nothing written."""
    run = fresh(laplace_run, tmp_path, "run")
    (run / "eval" / EVAL).mkdir(parents=True)
    (run / "eval" / EVAL / FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UqloraError, match=rf"corrupt logit Gaussians .*{FILE}.*delete the file"):
        evaluate(run, opts(mixed_task, link="mc", samples=2))
    assert not (run / "eval" / f"{EVAL}@laplace-mc").exists()
