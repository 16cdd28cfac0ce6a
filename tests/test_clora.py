"""C-LoRA (methods/clora.py) on the tiny random-init model.

Oracles: the KL and the context network recomputed by hand in float64 from the module's weights; plain PEFT
LoRA (the same adapter unwrapped, or with A replaced by M·A) for E at its mean with zero variance; the KL of a
batch against the KLs of its questions alone (padding must add nothing); repeated evaluations and an
uninterrupted run for reproducibility and bit-exact --resume.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import Interrupt, stop_at, write_jsonl_task
from uqlora.cli import main
from uqlora.config import TrainConfig
from uqlora.errors import UqloraError
from uqlora.evaluate import EvalOptions, evaluate
from uqlora.methods import get_method
from uqlora.train import train

RANK = 4
# 16 questions, batch 4, 1 epoch: 4 optimizer steps; a checkpoint every 2
RUN = dict(method="clora", epochs=1, batch_size=4, lr=5e-3, lora_r=RANK, device="cpu", framing="cloze", seed=3,
           save_every=2)


def config_for(model_dir, task, **kw) -> TrainConfig:
    return TrainConfig(**{**RUN, "model": str(model_dir), "task": f"jsonl:{task}", **kw}).validate()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_jsonl_task(tmp_path_factory.mktemp("task") / "arith.jsonl", 16)


@pytest.fixture(scope="module")
def clora_run(tmp_path_factory, tiny_model_dir, task):
    return train(config_for(tiny_model_dir, task), tmp_path_factory.mktemp("r") / "clora", quiet=True)


def wrapped_model(model_dir, context="on", kl_weight=1e-6, random_b=True, mean_init="identity"):
    """A fresh PEFT model of the tiny Llama (LoRA dropout 0), its LoRA B random (not 0) unless random_b is False,
    a deep copy before wrapping, and the prepared C-LoRA method."""
    from uqlora.models import add_lora, load_model

    model, tokenizer = load_model(str(model_dir), device="cpu")
    torch.manual_seed(0)
    model = add_lora(model, r=RANK, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    if random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    plain = copy.deepcopy(model)
    method = get_method("clora", TrainConfig(method="clora", lora_r=RANK, clora_context=context,
                                             clora_kl_weight=kl_weight, clora_mean_init=mean_init))
    return method.prepare(model), plain, method, tokenizer


def by_hand_distribution(factor, z: torch.Tensor, mean_init="identity"):
    """Eq. (2) in float64 from the factor's weights: M(z) [.., r, r] (I + the network's output, or the output
    alone for the random start) and σ(z) = sigmoid(ρ(z))²."""
    post, r = factor.posterior, z.shape[-1]
    if hasattr(post, "hidden"):
        h = torch.relu(z.double() @ post.hidden.weight.double().T + post.hidden.bias.double())
        out = h @ post.out.weight.double().T + post.out.bias.double()  # [.., 2r²]
        centre = torch.eye(r, dtype=torch.float64) if mean_init == "identity" else 0
        mean = out[..., : r * r].unflatten(-1, (r, r)) + centre
        rho = out[..., r * r:].unflatten(-1, (r, r))
    else:
        mean, rho = post.mean.double(), post.rho.double()
    return mean, torch.sigmoid(rho) ** 2


def questions(task, n):
    from uqlora.data import load_questions

    return load_questions(f"jsonl:{task}", "test")[:n]


def predictions(run, name):
    return [json.loads(line) for line in (run / "eval" / name / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("context, mean_init", [("on", "identity"), ("off", "identity"), ("on", "random"),
                                               ("off", "random")])
def test_kl_is_its_closed_form_over_real_tokens(tiny_model_dir, context, mean_init):
    """One layer's KL = Σ over real tokens and the r² entries of log(σp/σ) + (σ² + (M − c)²)/(2σp²) − 1/2, with M
    and σ from the weights by hand (float64) and the prior's centre c = I (identity start) or 0 (random start:
    then M does not start at I); changing the padded positions' inputs changes nothing."""
    _, _, method, _ = wrapped_model(tiny_model_dir, context, mean_init=mean_init)
    factor = next(iter(method.factors.values()))
    z = torch.randn(2, 5, RANK)  # [rows, T, r]
    method.mask.mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded by 2
    mean, std = by_hand_distribution(factor, z, mean_init)
    eye = torch.eye(RANK, dtype=torch.float64)
    centre = eye if mean_init == "identity" else 0
    if mean_init == "random":
        assert (mean - eye).abs().max() > 0.5
    else:
        assert torch.allclose(mean.expand(2, 5, RANK, RANK), eye)
    prior = factor.prior_std
    per_entry = (math.log(prior) - torch.log(std) + (std ** 2 + (mean - centre) ** 2)
                 / (2 * prior ** 2) - 0.5)  # [rows, T, r, r] (context off: [r, r] for every token)
    expected = (per_entry.expand(2, 5, RANK, RANK).sum((-2, -1)) * method.mask.mask).sum()
    kl = factor.kl(*factor.distribution(z), z)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-6)
    z_padded = z.clone()
    z_padded[0, :2] = 100 * torch.randn(2, RANK)
    assert torch.equal(factor.kl(*factor.distribution(z_padded), z_padded), kl)


def test_kl_of_a_batch_is_the_sum_over_its_questions(tiny_model_dir):
    """Through the model (cloze: question forward with left padding, continuations with right padding): the KL
    of two questions batched equals the sum of their KLs alone. LoRA B = 0 and no dropout make it noise-free."""
    from uqlora.framing import class_scores

    from uqlora.data.question import Question

    model, _, method, tokenizer = wrapped_model(tiny_model_dir, random_b=False)
    model.train()
    short = Question("a", "Is it?", ("yes", "no"), 0)
    long = Question("b", "Which of these numbers is the sum of seven and five?", ("twelve", "13", "fourteen"), 0)

    def kl(qs):
        class_scores("cloze", model, tokenizer, qs)
        return method.tally.take().item()

    alone = kl([short]) + kl([long])
    batched = kl([short, long])
    assert method.mask.mask.float().mean() < 1  # the continuations' forward has padding (both sides)
    assert batched == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("context", ["on", "off"])
def test_zero_variance_is_plain_lora_at_the_mean(tiny_model_dir, context):
    """σ = 0 (ρ = −inf): sampling gives the mean; at the start (M = I) the model is the unwrapped PEFT model;
    with another M the layer is plain LoRA with E = M: base(x) + s·B(M(z) z) (context off: LoRA with A -> M·A)."""
    model, plain, method, _ = wrapped_model(tiny_model_dir, context)
    factors = list(method.factors.values())
    with torch.no_grad():
        for f in factors:
            if context == "on":
                f.posterior.out.weight[RANK * RANK:] = 0
                f.posterior.out.bias[RANK * RANK:] = -math.inf
            else:
                f.posterior.rho.fill_(-math.inf)
    ids = torch.randint(0, 1000, (2, 7))
    for sampling in (False, True):
        model.train(sampling)
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=0)

    with torch.no_grad():
        for f in factors:
            if context == "on":
                f.posterior.out.weight[: RANK * RANK].normal_(0, 0.3)
            else:
                f.posterior.mean.add_(0.3 * torch.randn(RANK, RANK))
    name, layer = next((n, m) for n, m in model.named_modules() if n in method.factors)
    x = torch.randn(2, 5, layer.in_features)
    z = layer.lora_A["default"](x)  # [2, 5, r]
    mean, _ = by_hand_distribution(method.factors[name], z)
    lora = (mean @ z.double().unsqueeze(-1)).squeeze(-1) @ layer.lora_B["default"].weight.double().T  # [2, 5, d]
    expected = layer.base_layer(x).double() + layer.scaling["default"] * lora
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)  # float32 (~2e-6) vs float64
    if context == "off":
        with torch.no_grad():
            for n, m in plain.named_modules():
                if n in method.factors:
                    m.lora_A["default"].weight.copy_(method.factors[n].posterior.mean @ m.lora_A["default"].weight)
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("context", ["on", "off"])
def test_elbo_gradients_reach_the_posterior(tiny_model_dir, task, context):
    """The per-question loss sums to Σ NLL + β·KL; its gradient reaches every context network (or fixed M, ρ)
    parameter, and the KL alone reaches the variance head."""
    from uqlora.framing import class_scores

    model, _, method, tokenizer = wrapped_model(tiny_model_dir, context, kl_weight=0.5)
    model.train()
    qs = questions(task, 3)
    scores = class_scores("cloze", model, tokenizer, qs)
    kl = method.tally.total
    labels = torch.tensor([q.label for q in qs])
    losses = method.loss(scores, labels)
    nll = torch.nn.functional.cross_entropy(scores, labels, reduction="sum")
    assert losses.shape == (3,) and losses.sum().item() == pytest.approx((nll + 0.5 * kl).item(), rel=1e-6)
    losses.sum().backward()
    params = [p for f in method.factors.values() for p in f.parameters()]
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    model.zero_grad()
    class_scores("cloze", model, tokenizer, qs)
    method.tally.take().backward()
    for f in method.factors.values():
        rho_grad = f.posterior.out.weight.grad[RANK * RANK:] if context == "on" else f.posterior.rho.grad
        assert rho_grad.abs().sum() > 0


@pytest.mark.parametrize("context", ["on", "off"])
def test_variance_depends_on_the_input_only_with_context(tiny_model_dir, context):
    """Two different inputs: different σ with the context network, the same σ without it."""
    model, _, method, _ = wrapped_model(tiny_model_dir, context)
    seen = []
    factor = next(iter(method.factors.values()))
    factor.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    model.eval()
    model(input_ids=torch.tensor([[5, 17, 230], [9, 400, 31]]))
    z = seen[0]  # [2, 3, r]
    _, std = factor.distribution(z)
    std = std.expand(2, 3, RANK, RANK)
    assert not torch.equal(z[0, -1], z[1, -1])
    assert torch.equal(std[0, -1], std[1, -1]) == (context == "off")


@pytest.mark.parametrize("context", ["on", "off"])
def test_noise_is_drawn_per_example_and_token(tiny_model_dir, context):
    """The same row twice in a batch: different outputs when sampling, and at every position; equal at the mean."""
    model, _, method, _ = wrapped_model(tiny_model_dir, context)
    ids = torch.tensor([[5, 17, 230, 8]] * 2)
    model.train()
    logits = model(input_ids=ids).logits  # [2, 4, V]
    assert all(not torch.allclose(logits[0, t], logits[1, t]) for t in range(4))
    model.eval()
    logits = model(input_ids=ids).logits
    assert torch.equal(logits[0], logits[1])


def test_run_directory_and_reproducible_predictions(clora_run, task):
    """adapter/ holds only LoRA A and B, posterior/clora.safetensors the E factors; --samples 4 --seed 1 twice gives
    the same predictions (another seed others); --samples 0 (the mean) is deterministic, one draw, in @clora-mean."""
    adapter = load_file(clora_run / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    posterior = load_file(clora_run / "posterior" / "clora.safetensors")
    assert len(posterior) == 4 * (len(adapter) // 2)  # per LoRA layer (A, B): hidden and out, weight and bias
    opts = dict(task=f"jsonl:{task}", quiet=True, max_examples=4)

    metrics = evaluate(clora_run, EvalOptions(samples=4, seed=1, **opts))
    first = predictions(clora_run, "jsonl-arith")
    evaluate(clora_run, EvalOptions(samples=4, seed=1, **opts))
    assert metrics["n_samples"] == 4 and predictions(clora_run, "jsonl-arith") == first
    assert any(p["mutual_information"] > 0 for p in first)
    evaluate(clora_run, EvalOptions(samples=4, seed=2, **opts))
    assert predictions(clora_run, "jsonl-arith") != first

    metrics = evaluate(clora_run, EvalOptions(samples=0, seed=1, **opts))
    mean = predictions(clora_run, "jsonl-arith@clora-mean")
    evaluate(clora_run, EvalOptions(samples=0, seed=2, **opts))
    assert metrics["n_samples"] == 1 and predictions(clora_run, "jsonl-arith@clora-mean") == mean


def test_resume_matches_uninterrupted(tmp_path, clora_run, tiny_model_dir, task):
    """Checkpoint at step 2, interrupted after step 3, resumed: the same adapter and posterior, bit for bit."""
    assert_resume_matches(config_for(tiny_model_dir, task), tmp_path / "run", clora_run)


def assert_resume_matches(cfg, run_dir, whole_run) -> None:
    """Train `cfg` into `run_dir`, interrupted after step 3 (checkpoint at 2) and resumed: the adapter and the
    posterior equal those of the uninterrupted `whole_run`, bit for bit."""
    with pytest.raises(Interrupt):
        train(cfg, run_dir, quiet=True, step_hook=stop_at(3))
    train(cfg, run_dir, resume=True, quiet=True)
    for name in ("posterior/clora.safetensors", "adapter/adapter_model.safetensors"):
        resumed, whole = load_file(run_dir / name), load_file(whole_run / name)
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.parametrize("context", ["on", "off"])
def test_context_lr_steps_the_posterior_by_plain_sgd(tmp_path, tiny_model_dir, task, monkeypatch, context):
    """clora_context_lr > 0: AdamW holds LoRA's A and B only, the E posteriors' parameters (4 tensors a layer with
    the context network, M and ρ without) none of them; after each AdamW step each of those moves by exactly
    −lr · factor · its gradient (factor: the run's warm-up/decay schedule at that step, as `lr_factor` computes it)
    and its gradient is cleared; a resumed run equals the uninterrupted one bit for bit (plain SGD keeps no state)."""
    import uqlora.train as train_module

    real_adamw, real_sgd_step = torch.optim.AdamW, train_module.sgd_step
    adamw_params, sgd_params, steps = [], [], []

    def recording_adamw(params, **kw):
        adamw_params[:] = list(params)
        return real_adamw(adamw_params, **kw)

    def checked_sgd_step(params, lr, factor, accelerator):
        before = [(p.detach().clone(), p.grad.detach().clone()) for p in params]
        real_sgd_step(params, lr, factor, accelerator)
        sgd_params[:] = params
        steps.append((lr, factor))
        for p, (value, grad) in zip(params, before):
            assert p.grad is None and torch.allclose(p, value - lr * factor * grad, rtol=0, atol=1e-7)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    monkeypatch.setattr(train_module, "sgd_step", checked_sgd_step)
    cfg = config_for(tiny_model_dir, task, clora_context=context, clora_context_lr=0.05)
    run = train(cfg, tmp_path / "whole", quiet=True)
    assert adamw_params and all(p.ndim == 2 and RANK in p.shape for p in adamw_params)
    assert len(sgd_params) == (2 if context == "on" else 1) * len(adamw_params)
    assert not {id(p) for p in sgd_params} & {id(p) for p in adamw_params}
    total = 4  # 16 questions, batches of 4, one epoch
    assert steps == [(0.05, train_module.lr_factor(i, total, round(cfg.warmup_ratio * total))) for i in range(total)]
    assert_resume_matches(cfg, tmp_path / "resumed", run)


def test_context_off_trains_and_evaluates_from_the_cli(tmp_path, tiny_model_dir, task):
    """`--clora-context off`: the posterior holds one learned M and ρ per layer; evaluate samples it."""
    run = tmp_path / "off"
    argv = ["train", "--out", run, "--model", tiny_model_dir, "--task", f"jsonl:{task}", "--method", "clora",
            "--clora-context", "off", "--epochs", "1", "--batch-size", "8", "--lora-r", RANK, "--device", "cpu",
            "--framing", "cloze", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    posterior = load_file(run / "posterior" / "clora.safetensors")
    assert {k.rsplit(".", 1)[1] for k in posterior} == {"mean", "rho"}
    assert all(v.shape == (RANK, RANK) for v in posterior.values())
    argv = ["evaluate", run, "--task", f"jsonl:{task}", "--samples", "2", "--max-examples", "4", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    assert json.loads((run / "eval" / "jsonl-arith" / "metrics.json").read_text())["n_samples"] == 2


@pytest.mark.parametrize("tamper", ["other shape", "missing tensor", "context off", "no posterior"])
def test_posterior_of_another_adapter_is_refused(tmp_path, clora_run, task, tamper):
    """A posterior whose tensors are not this adapter's E factors (or none) is refused with one clear error."""
    run = tmp_path / "run"
    shutil.copytree(clora_run, run, ignore=shutil.ignore_patterns("eval"))
    path = run / "posterior" / "clora.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    if tamper == "other shape":
        state[key] = state[key][:-1].contiguous()
    elif tamper == "missing tensor":
        del state[key]
    elif tamper == "context off":  # the run's config says on
        state = {k.split(".posterior.")[0] + f".posterior.{p}": torch.zeros(RANK, RANK)
                 for k in state for p in ("mean", "rho")}
    save_file(state, path) if tamper != "no posterior" else path.unlink()
    match = "needs one adapter with its posterior" if tamper == "no posterior" else "does not match the run's adapter"
    with pytest.raises(UqloraError, match=match):
        evaluate(run, EvalOptions(task=f"jsonl:{task}", quiet=True, max_examples=2))
