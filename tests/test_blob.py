"""BLoB (methods/blob.py) on the tiny random-init model.

Oracles: the Gaussian KL written out by hand in float64; plain PEFT LoRA for the output at zero std and at the
posterior mean; the exact variance Σ_i Ω_ki² x_i² of a weight sample's ΔA x for the Flipout draws; the closed-form
KL gradient; bit-identical files and predictions for reruns, seeds and resumed runs.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import Interrupt, predictions, probs_of, stop_at
from uqlora.config import TrainConfig
from uqlora.data import load_questions
from uqlora.data.question import Question
from uqlora.errors import UqloraError
from uqlora.evaluate import EvalOptions, evaluate
from uqlora.framing import class_scores
from uqlora.methods.blob import BlobMethod, Draw, kl_weight
from uqlora.schedule import lr_factor
from uqlora.models import add_lora, load_model
from uqlora.train import train

LAYERS = 4  # 2 blocks x (q_proj, v_proj)
PRIOR_STD = 0.2


def blob_config(model_dir, task_file, **kw) -> TrainConfig:
    """6 steps of 4 questions; ε = 0.3 (not 0.05) so that the draws visibly move the tiny model's predictions."""
    base = dict(model=str(model_dir), task=f"jsonl:{task_file}", method="blob", batch_size=4, lr=5e-3, lora_r=4,
                device="cpu", framing="cloze", epochs=1, seed=3, save_every=2, blob_init_g=0.3)
    return TrainConfig(**{**base, **kw}).validate()


def peft_model(model_dir, dropout: float = 0.0):
    """The tiny model with fresh LoRA layers whose B is random (PEFT starts B at 0, which would hide A)."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(model_dir), device="cpu")
    model = add_lora(model, r=4, alpha=16, dropout=dropout, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model, tokenizer


def lora_a_weights(model) -> dict[str, torch.Tensor]:
    """Every LoRA A of the model by its layer's name, found by parameter name (independently of the method)."""
    suffix = ".lora_A.default.weight"
    return {n[: -len(suffix)]: p for n, p in model.named_parameters() if n.endswith(suffix)}


def first_layer(model):
    name = next(iter(lora_a_weights(model)))
    return name, model.get_submodule(name)


def opts(task_file, **kw) -> EvalOptions:
    return EvalOptions(task=f"jsonl:{task_file}", quiet=True, max_examples=12, **kw)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory, tiny_model_dir, task):
    return train(blob_config(tiny_model_dir, task), tmp_path_factory.mktemp("r") / "blob", quiet=True)


def test_kl_is_the_closed_form_over_every_lora_a(tiny_model_dir, task):
    """KL = Σ ½(Ω²/σp² + M²/σp² − 1 − ln(Ω²/σp²)) by hand in float64 over every LoRA A of the model and
    its G (Ω = G²); with --blob-kl-lr 0 each question's loss adds π_i·KL/S to its cross-entropy,
    π_i = 2^i/(2^(M+1)−1) or 1/M."""
    cfg = blob_config(tiny_model_dir, task, grad_accum=2, blob_kl_lr=0.0)
    model, _ = peft_model(tiny_model_dir)
    method = BlobMethod(cfg)
    method.prepare(model)
    means, g = lora_a_weights(model), method.state_dict()
    assert len(means) == LAYERS and set(g) == {f"{n}.G" for n in means}
    var_ratio = {n: g[f"{n}.G"].double() ** 4 / PRIOR_STD ** 2 for n in means}
    by_hand = sum(0.5 * (var_ratio[n] + a.detach().double() ** 2 / PRIOR_STD ** 2 - 1 - torch.log(var_ratio[n])).sum()
                  for n, a in means.items())
    assert method.kl().dtype == torch.float64
    torch.testing.assert_close(method.kl().detach(), by_hand, rtol=1e-12, atol=0)

    steps_per_epoch, questions_per_step = 6, 4 * 2
    method.on_train_start(model, 2 * steps_per_epoch, steps_per_epoch)
    scores, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    for step in (0, 5, 8):
        method.learning_rate(step, 1.0)
        i = step % steps_per_epoch + 1
        extra = method.loss(scores, labels) - F.cross_entropy(scores, labels, reduction="none")
        expected = 2 ** i / (2 ** (steps_per_epoch + 1) - 1) * float(by_hand) / questions_per_step
        torch.testing.assert_close(extra, torch.full((3,), expected), rtol=1e-5, atol=0)
    weights = [kl_weight(s, steps_per_epoch, "reweighted") for s in range(steps_per_epoch)]
    assert weights == sorted(weights) and sum(weights) == pytest.approx(1 - 1 / (2 ** 7 - 1), rel=1e-12)
    assert kl_weight(3, steps_per_epoch, "uniform") == 1 / steps_per_epoch
    assert kl_weight(0, 5000, "reweighted") == 0.0 and kl_weight(4999, 5000, "reweighted") == 0.5  # no overflow


def test_zero_std_and_the_mean_give_plain_lora(tiny_model_dir, task):
    """Oracle: the PEFT LoRA model before wrapping. With Ω = 0 a draw changes nothing (layer and class scores);
    without a draw (the posterior mean) the output is plain LoRA's even with Ω > 0."""
    model, tokenizer = peft_model(tiny_model_dir)
    name, layer = first_layer(model)
    qs = load_questions(f"jsonl:{task}", "test")[:3]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        plain_out, plain_scores = layer(x), class_scores("cloze", model, tokenizer, qs)
        method = BlobMethod(blob_config(tiny_model_dir, task))
        method.prepare(model)
        assert torch.equal(layer(x), plain_out)  # the mean
        for q in method.posteriors.values():
            q.g.zero_()
        with method.drawing(Draw(3, torch.arange)):
            assert torch.equal(layer(x), plain_out)
        with method.scoring(qs):
            torch.testing.assert_close(class_scores("cloze", model, tokenizer, qs), plain_scores, rtol=0, atol=1e-6)


def test_flipout_gives_each_example_its_own_weight_sample(tiny_model_dir, task):
    """Rows 0 and 2 hold the same input: their perturbations differ and are uncorrelated over draws; the mean of
    the outputs over draws approaches the mean output; each output's variance over draws is the exact one of a
    weight sample, scaling²·Σ_k B_jk² Σ_i Ω_ki² x_i²; a question keeps its sample in all its forwards."""
    model, _ = peft_model(tiny_model_dir)
    method = BlobMethod(blob_config(tiny_model_dir, task))
    method.prepare(model)
    name, layer = first_layer(model)
    x1, x2 = torch.randn(2, 5, 64)
    x = torch.stack([x1, x2, x1])  # [3, T, d]
    n_draws = 1000
    with torch.no_grad():
        mean_out = layer(x)
        perts = []
        for _ in range(n_draws):
            with method.drawing(Draw(3, torch.arange)):
                perts.append(layer(x) - mean_out)
        pert = torch.stack(perts).double()  # [N, 3, T, out]
        assert not torch.allclose(pert[0, 0], pert[0, 2]) and not torch.allclose(pert[0, 0], pert[0, 1])
        a, b = pert[:, 0, 0, :8], pert[:, 2, 0, :8]  # 8 outputs at position 0, same input in rows 0 and 2
        corr = ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0) * b.std(0))
        assert corr.abs().max() < 0.15  # sd of the estimate: 0.03
        sd = pert.std(0)
        assert (pert.mean(0).abs() <= 5 * sd / math.sqrt(n_draws)).all()
        omega2 = method.posteriors[name].std().double() ** 2  # [r, in]
        b_weight, scaling = layer.lora_B["default"].weight.double(), layer.scaling["default"]  # [out, r]
        var_a = (x.double() ** 2) @ omega2.T  # [3, T, r]: Var(ΔA x) of one weight sample
        exact = scaling ** 2 * var_a @ (b_weight ** 2).T  # [3, T, out]
        torch.testing.assert_close(pert.var(0), exact, rtol=0.25, atol=0)  # sd of the estimate: 4.5%

        qs = [Question("a", "?", ("1", "2"), 0), Question("b", "?", ("1", "2", "3"), 0)]
        with method.scoring(qs):  # the cloze framing: 2 question rows, then 5 continuation rows
            questions = layer(x1.expand(2, 5, 64)) - mean_out[0]
            continuations = layer(x1.expand(5, 5, 64)) - mean_out[0]
    assert not torch.allclose(questions[0], questions[1])
    for row, owner in enumerate([0, 0, 1, 1, 1]):
        torch.testing.assert_close(continuations[row], questions[owner], rtol=0, atol=1e-7)


def test_elbo_gradients_reach_g_and_the_mean(tiny_model_dir, task):
    """Through the sampled NLL both G and the A mean get gradients; the ELBO (--blob-kl-lr 0) adds exactly β∇KL
    with ∂KL/∂G = −2/G + 2G³/σp² and ∂KL/∂M = M/σp² (β = π_i/S)."""
    cfg = blob_config(tiny_model_dir, task, blob_kl_lr=0.0)
    model, tokenizer = peft_model(tiny_model_dir, dropout=0.1)
    method = BlobMethod(cfg)
    method.prepare(model)
    model.train()
    method.on_train_start(model, 6, 6)
    method.learning_rate(5, 1.0)  # the epoch's last step: π = 2^6/(2^7 − 1)
    beta = 2 ** 6 / (2 ** 7 - 1) / cfg.batch_size
    qs = load_questions(f"jsonl:{task}", "train")[:4]
    labels = torch.tensor([q.label for q in qs])
    with method.scoring(qs):
        scores = class_scores("cloze", model, tokenizer, qs)
    names = list(method.posteriors)
    gs = [method.posteriors[n].g for n in names]
    means = [lora_a_weights(model)[n] for n in names]
    nll_grads = torch.autograd.grad(F.cross_entropy(scores, labels), gs + means, retain_graph=True)
    elbo_grads = torch.autograd.grad(method.loss(scores, labels).mean(), gs + means)
    assert all(gr.abs().sum() > 0 and torch.isfinite(gr).all() for gr in nll_grads)
    for g, nll_g, elbo_g in zip(gs, nll_grads[:LAYERS], elbo_grads[:LAYERS]):
        torch.testing.assert_close(elbo_g - nll_g, beta * (-2 / g + 2 * g ** 3 / PRIOR_STD ** 2).detach(),
                                   rtol=1e-4, atol=1e-6)
    for m, nll_g, elbo_g in zip(means, nll_grads[LAYERS:], elbo_grads[LAYERS:]):
        torch.testing.assert_close(elbo_g - nll_g, beta * m.detach() / PRIOR_STD ** 2, rtol=1e-4, atol=1e-7)


def test_separate_kl_step_is_sgd_on_the_weighted_kl(tiny_model_dir, task):
    """Default (the authors' scheme): the loss is the NLL alone; after optimizer step i the KL takes its own SGD
    step, G -= lr_kl·f·π_i·(−2/G + 2G³/σp²) and M -= lr_kl·f·π_i·M/σp² (f: the warm-up/decay factor of the step),
    by the closed-form gradients; B does not move."""
    cfg = blob_config(tiny_model_dir, task, blob_kl_lr=0.05)
    model, _ = peft_model(tiny_model_dir)
    method = BlobMethod(cfg)
    method.prepare(model)
    method.on_train_start(model, 12, 6)  # 2 epochs of 6 steps, warm-up round(0.1 · 12) = 1 step
    scores, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    method.learning_rate(5, 1.0)
    torch.testing.assert_close(method.loss(scores, labels), F.cross_entropy(scores, labels, reduction="none"))
    names = list(method.posteriors)
    before_g = [method.posteriors[n].g.detach().clone() for n in names]
    before_m = [lora_a_weights(model)[n].detach().clone() for n in names]
    before_b = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}
    method.on_step_end(model, 6)  # after 0-based step 5, the epoch's last: π = 2^6/(2^7 − 1)
    rate = 0.05 * lr_factor(5, 12, 1) * 2 ** 6 / (2 ** 7 - 1)
    for n, g, m in zip(names, before_g, before_m):
        g64, m64 = g.double(), m.double()
        expected_g = g64 - rate * (-2 / g64 + 2 * g64 ** 3 / PRIOR_STD ** 2)
        torch.testing.assert_close(method.posteriors[n].g.double(), expected_g, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lora_a_weights(model)[n].double(), m64 - rate * m64 / PRIOR_STD ** 2,
                                   rtol=1e-6, atol=1e-8)
    assert all(torch.equal(v, before_b[k]) for k, v in model.named_parameters() if "lora_B" in k)


def test_blob_run_directory(blob_run):
    """adapter/ holds only LoRA A and B (A: the posterior mean); posterior/blob.safetensors one G per layer."""
    adapter = load_file(blob_run / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * LAYERS and all("lora_A" in k or "lora_B" in k for k in adapter)
    posterior = load_file(blob_run / "posterior" / "blob.safetensors")
    assert len(posterior) == LAYERS and all(k.endswith(".G") and v.shape == (4, 64) for k, v in posterior.items())
    assert not (blob_run / "checkpoint").exists()


def test_draws_are_seeded(blob_run, task):
    """The same --seed gives the same predictions; another seed other draws; draws disagree (MI > 0)."""
    first = evaluate(blob_run, opts(task, samples=4, seed=1))
    probs = probs_of(blob_run)
    assert first["n_samples"] == 4 and first["mean_mutual_information"] > 0
    evaluate(blob_run, opts(task, samples=4, seed=1))
    assert torch.equal(probs_of(blob_run), probs)
    evaluate(blob_run, opts(task, samples=4, seed=2))
    assert not torch.equal(probs_of(blob_run), probs)


def test_zero_samples_is_the_deterministic_mean(tmp_path, blob_run, task):
    """--samples 0 twice: identical, one draw, in eval/TASK@blob-mean; it equals sampling with Ω = 0 (G zeroed)."""
    metrics = evaluate(blob_run, opts(task, samples=0))
    mean = probs_of(blob_run, "jsonl-arith@blob-mean")
    assert metrics["n_samples"] == 1
    evaluate(blob_run, opts(task, samples=0, seed=5))
    assert torch.equal(probs_of(blob_run, "jsonl-arith@blob-mean"), mean)
    run = tmp_path / "run"
    shutil.copytree(blob_run, run, ignore=shutil.ignore_patterns("eval"))
    posterior = load_file(run / "posterior" / "blob.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in posterior.items()}, run / "posterior" / "blob.safetensors")
    zero_std = evaluate(run, opts(task, samples=3))
    assert zero_std["mean_mutual_information"] == pytest.approx(0, abs=1e-9)
    torch.testing.assert_close(probs_of(run), mean, rtol=0, atol=1e-6)


def test_resume_matches_uninterrupted(tmp_path, blob_run, tiny_model_dir, task):
    """Checkpoint at step 4, interrupted at 5, resumed: the same adapter, posterior and training log, bit for bit."""
    cfg = blob_config(tiny_model_dir, task)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", quiet=True, step_hook=stop_at(5))
    assert (tmp_path / "run" / "checkpoint").is_dir()
    train(cfg, tmp_path / "run", resume=True, quiet=True)
    for name in ("posterior/blob.safetensors", "adapter/adapter_model.safetensors"):
        resumed, whole = load_file(tmp_path / "run" / name), load_file(blob_run / name)
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert (tmp_path / "run" / "train_log.jsonl").read_text() == (blob_run / "train_log.jsonl").read_text()


@pytest.mark.parametrize("tamper", ["missing layer", "other shape", "no posterior"])
def test_posterior_of_another_adapter_is_refused(tmp_path, blob_run, task, tamper):
    """A posterior without a G for every LoRA layer, of another shape, or none at all: one clear error."""
    run = tmp_path / "run"
    shutil.copytree(blob_run, run, ignore=shutil.ignore_patterns("eval"))
    path = run / "posterior" / "blob.safetensors"
    posterior = load_file(path)
    first = sorted(posterior)[0]
    if tamper == "missing layer":
        del posterior[first]
    elif tamper == "other shape":
        posterior[first] = posterior[first][:, :32].contiguous()
    if tamper == "no posterior":
        path.unlink()
    else:
        save_file(posterior, path)
    match = "no posterior/blob.safetensors" if tamper == "no posterior" else "does not match the run's adapter"
    with pytest.raises(UqloraError, match=match):
        evaluate(run, opts(task, samples=2))


@pytest.mark.parametrize("bad", [dict(blob_prior_std=0.0), dict(blob_init_g=-0.1), dict(blob_kl_schedule="cosine")])
def test_bad_blob_options_are_refused(tiny_model_dir, task, bad):
    with pytest.raises(UqloraError, match="blob_"):
        blob_config(tiny_model_dir, task, **bad)
