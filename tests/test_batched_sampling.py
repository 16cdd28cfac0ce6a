"""Batched posterior sampling (methods/batched.py) on the tiny random-init model.

Oracle: the sequential loop (`sample_batching(1)`: one draw per forward; SWAG writes each draw into the LoRA
weights, ensembles switch adapters). Every sampling method must give the same [S, B, C] probabilities when its
draws share one forward, in one chunk or several, for both framings and questions with 2 to 5 choices; the model
must come back unchanged; `uqlora evaluate --sample-batch` must give the sequential run's metrics.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_llama, write_jsonl_task
from uqlora.cli import main
from uqlora.config import TrainConfig
from uqlora.data.question import Question
from uqlora.errors import UqloraError
from uqlora.framing import class_scores
from uqlora.methods import get_method
from uqlora.methods.base import Adapter
from uqlora.methods.batched import (AUTO, SEQUENTIAL, SampleBatching, _halving_on_oom, cpu_draw_limit, draw_bytes,
                                     sample_batching)
from uqlora.methods.blob import G_KEY, lora_layers
from uqlora.methods.swag import flatten, lora_parameters, write_flat
from uqlora.methods.swag_moments import SwagMoments

pytestmark = pytest.mark.usefixtures("single_thread")

RANK = 4
SEED = 7
ATOL = 1e-5  # fp32: the batched matmuls may round differently from the per-draw ones
QUESTIONS = [Question("two", "What is 1 plus 1?", ("2", "3"), 0),
             Question("three", "What colour is the sky on a clear day?", ("blue", "green", "a deep red"), 0),
             Question("five", "Pick the second letter of the alphabet.", ("a", "b", "c", "d", "e"), 1),
             Question("four", "Which number is even?", ("7", "9", "12", "15"), 2)]


def peft_model(tokenizer, adapters=("default",), dropout=0.0):
    """The tiny Llama with LoRA adapters (r = 4 on q_proj and v_proj) whose A and B are random (PEFT starts B at 0,
    which would hide every draw)."""
    config = LoraConfig(r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(tokenizer), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    model.set_adapter(adapters[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return model.eval()


def swag_posterior(model, adapter: str) -> dict[str, torch.Tensor]:
    """SWAG moments of 4 random snapshots around the adapter (rank 3), whose mean is then written into it."""
    params = lora_parameters(model, adapter)
    theta = flatten(params)
    moments = SwagMoments(theta.numel(), 3)
    for _ in range(4):
        moments.collect(theta + 0.2 * torch.randn_like(theta))
    write_flat(params, moments.mean)
    return moments.state_dict()


def clora_posterior(model, context: str) -> dict[str, torch.Tensor]:
    """Random E factors for the model's LoRA layers (trained C-LoRA state: M away from I, σ per token)."""
    method = get_method("clora", clora_config(context))
    method.prepare(copy.deepcopy(model))
    with torch.no_grad():
        for factor in method.factors.values():
            for p in factor.parameters():
                p.normal_(0, 0.3)
    return method.state_dict()


def clora_config(context: str) -> TrainConfig:
    return TrainConfig(method="clora", lora_r=RANK, clora_context=context)


def bound(name: str, tokenizer):
    """(method, model): a sampling method bound with seed SEED to a tiny model with random LoRA weights."""
    torch.manual_seed(0)
    if name in ("ensemble", "multiswag"):
        names = ("member0", "member1", "member2")
        model = peft_model(tokenizer, names)
        adapters = [Adapter(a, swag_posterior(model, a) if name == "multiswag" else {}) for a in names]
        method = get_method(name, TrainConfig(method=name))
    elif name == "mc-dropout":
        model = peft_model(tokenizer, dropout=0.3)
        adapters, method = [Adapter("default", {})], get_method(name, TrainConfig(method=name, lora_dropout=0.3))
    elif name == "swag":
        model = peft_model(tokenizer)
        adapters, method = [Adapter("default", swag_posterior(model, "default"))], get_method(name, TrainConfig())
    elif name == "blob":
        model = peft_model(tokenizer)
        gs = {f"{n}.{G_KEY}": 0.5 * torch.rand_like(m.lora_A["default"].weight)
              for n, m in lora_layers(model, "default").items()}
        adapters, method = [Adapter("default", gs)], get_method(name, TrainConfig(method=name))
    else:  # clora-on, clora-off
        context = name.split("-")[1]
        model = peft_model(tokenizer)
        adapters = [Adapter("default", clora_posterior(model, context))]
        method = get_method("clora", clora_config(context))
    method.bind(model, adapters, seed=SEED)
    return method, model

ALL = 64  # a sample batch above every test's draws: all of them in one forward


def predict(method, model, tokenizer, framing: str, n_samples: int, sample_batch: int,
            questions=QUESTIONS) -> torch.Tensor:
    """method.predict's [S, B, C] with `sample_batch` draws per forward."""
    with torch.no_grad(), sample_batching(sample_batch):
        return method.predict(lambda qs: class_scores(framing, model, tokenizer, qs), questions, n_samples)


SAMPLING = ["swag", "multiswag", "ensemble", "mc-dropout", "blob", "clora-on", "clora-off"]


@pytest.mark.parametrize("framing", ["letter", "cloze"])
@pytest.mark.parametrize("name", SAMPLING)
def test_batched_equals_sequential(name, framing, tokenizer):
    """One forward for all draws, and chunks of 2, give the sequential loop's [S, B, C] within 1e-5 for
    questions of 2, 3, 4 and 5 choices (absent choices probability 0); the draws really differ from each other."""
    method, model = bound(name, tokenizer)
    n_samples = 3
    sequential = predict(method, model, tokenizer, framing, n_samples, SEQUENTIAL)
    draws = 3 if name == "ensemble" else 9 if name == "multiswag" else n_samples
    assert sequential.shape == (draws, len(QUESTIONS), 5)
    assert (sequential[:, 0, 2:] == 0).all() and (sequential[:, 1, 3:] == 0).all()
    assert (sequential[0] - sequential[1]).abs().max() > 1e-3
    for sample_batch in (ALL, 2):
        batched = predict(method, model, tokenizer, framing, n_samples, sample_batch)
        torch.testing.assert_close(batched, sequential, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["swag", "mc-dropout", "blob", "clora-on"])
def test_chunks_give_the_draws_of_one_call(name, tokenizer):
    """S = 5 in chunks of 2 (2 + 2 + 1) equals the 5 draws in one forward; a batch's draws do not depend on what
    was predicted before (each draw's generator starts afresh: no global RNG state carries over)."""
    method, model = bound(name, tokenizer)
    whole = predict(method, model, tokenizer, "cloze", 5, 5)
    torch.testing.assert_close(predict(method, model, tokenizer, "cloze", 5, 2), whole, atol=ATOL, rtol=0)
    predict(method, model, tokenizer, "cloze", 3, AUTO, questions=QUESTIONS[1:3])
    torch.testing.assert_close(predict(method, model, tokenizer, "cloze", 5, 1), whole, atol=ATOL, rtol=0)


def test_temperature_on_a_sampling_base_batches_its_draws(tokenizer):
    """Temperature scaling of a SWAG base (what `posthoc --method temperature` fits and evaluate applies) hands
    the sample batching to its base: batched and sequential give the same tempered draws."""
    swag, model = bound("swag", tokenizer)
    method = get_method("temperature", TrainConfig(method="temperature", base_method="swag"))
    method.base, method.temperature = swag, 2.0  # the bound base and a fitted T, without a run directory
    calls = []

    def score_fn(qs):
        calls.append(len(qs))
        return class_scores("cloze", model, tokenizer, qs)

    with torch.no_grad():
        with sample_batching(SEQUENTIAL):
            sequential = method.predict(score_fn, QUESTIONS, 3)
        with sample_batching(ALL):
            batched = method.predict(score_fn, QUESTIONS, 3)
    assert calls == [4, 4, 4, 12]
    torch.testing.assert_close(batched, sequential, atol=ATOL, rtol=0)


def model_state(model) -> dict:
    """What a prediction must leave as it found it: tensors, modules, hooks, train flags, trainable flags and
    the active adapter."""
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(n, id(m)) for n, m in model.named_modules()],
            "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            "training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "adapter": model.active_adapter}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    assert {k: v for k, v in before.items() if k != "tensors"} == {k: v for k, v in after.items() if k != "tensors"}


class Boom(Exception):
    pass


@pytest.mark.parametrize("name", SAMPLING)
def test_model_is_restored(name, tokenizer):
    """After a batched predict, and after one whose forward raises, the model has the same weights, modules,
    hooks, train/eval and requires_grad flags and active adapter as before, and BLoB and C-LoRA draw no more
    noise (their posterior mean again)."""
    method, model = bound(name, tokenizer)
    model.set_adapter(model.active_adapter)  # PEFT's set_adapter makes the active adapter trainable: a state to keep
    before = model_state(model)
    predict(method, model, tokenizer, "cloze", 2, ALL)
    assert_same_state(before, model_state(model))

    def failing(qs):
        class_scores("cloze", model, tokenizer, qs)
        raise Boom

    with pytest.raises(Boom), sample_batching(ALL):
        method.predict(failing, QUESTIONS, 2)
    assert_same_state(before, model_state(model))
    assert getattr(method, "draw", None) is None  # BLoB: back at the posterior mean
    assert all(factor.draws is None for factor in getattr(method, "factors", {}).values())  # C-LoRA: E = M


def test_forwards_that_are_not_the_replicated_questions_are_refused(tokenizer):
    """A score function whose forwards do not hold the questions it was given (here: it drops one) cannot be
    batched: one clear error, naming the way out; a negative sample batch is refused too."""
    method, model = bound("swag", tokenizer)
    with pytest.raises(UqloraError, match="--sample-batch 1"), sample_batching(ALL):
        method.predict(lambda qs: class_scores("letter", model, tokenizer, qs[1:]), QUESTIONS[:2], 3)
    with pytest.raises(UqloraError, match="--sample-batch must be >= 0"), sample_batching(-1):
        pass


def test_cpu_chunks_are_bounded_by_the_memory_estimate(tokenizer, monkeypatch):
    """The estimate grows with the questions (more choices, longer prompts) and counting tokens gives less than
    bounding them by bytes; on the CPU a sample batch of 5 is capped at half the available RAM over it (here 2), and
    predictions in those chunks equal the sequential ones; auto on the CPU is one draw per forward."""
    import psutil

    method, model = bound("mc-dropout", tokenizer)
    assert draw_bytes(model, QUESTIONS) > draw_bytes(model, QUESTIONS[:1]) > 0
    assert 0 < draw_bytes(model, QUESTIONS, tokenizer) < draw_bytes(model, QUESTIONS)  # tokens <= bytes
    budget = type("Memory", (), {"available": 4 * draw_bytes(model, QUESTIONS)})  # 2 draws fit in half of it
    monkeypatch.setattr(psutil, "virtual_memory", lambda: budget)
    assert cpu_draw_limit(model, QUESTIONS) == 2
    forwards = []
    model.register_forward_pre_hook(lambda _module, args, kwargs: forwards.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    capped = predict(method, model, tokenizer, "letter", 5, 5)
    assert forwards == [2 * len(QUESTIONS)] * 2 + [len(QUESTIONS)]  # chunks of 2, 2, 1 draws
    forwards.clear()
    torch.testing.assert_close(predict(method, model, tokenizer, "letter", 5, AUTO), capped, atol=ATOL, rtol=0)
    assert forwards == [len(QUESTIONS)] * 5


def test_cuda_out_of_memory_halves_the_chunk():
    """Auto mode on CUDA tries every draw left in one forward; an out-of-memory error halves the chunk (5 -> 2) and
    the smaller size is kept for the rest of the evaluation; the draws come back complete and in order; one draw
    that does not fit raises."""
    tried = []

    def score(draws: range) -> torch.Tensor:  # fits up to 2 draws; [len(draws), 1, 1] holding the draw indices
        tried.append(len(draws))
        if len(draws) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.tensor(list(draws), dtype=torch.float32).view(-1, 1, 1)

    setting = SampleBatching(AUTO)
    assert _halving_on_oom(5, score, setting).flatten().tolist() == [0, 1, 2, 3, 4]
    assert tried == [5, 2, 2, 1] and setting.cuda_limit == 2
    assert _halving_on_oom(3, score, setting).flatten().tolist() == [0, 1, 2] and tried[4:] == [2, 1]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _halving_on_oom(2, lambda draws: score(range(3)), SampleBatching(AUTO))


def test_cli_sample_batch_gives_the_sequential_metrics(tmp_path, tiny_model_dir):
    """`uqlora evaluate --sample-batch 1` (sequential) and the default (auto) and `--sample-batch 2` write the same
    metrics and predictions for an mc-dropout run; a negative value is refused with one line."""
    task = write_jsonl_task(tmp_path / "arith.jsonl", 8)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--model", str(tiny_model_dir), "--task", f"jsonl:{task}",
                 "--method", "mc-dropout", "--lora-dropout", "0.3", "--epochs", "1", "--batch-size", "4",
                 "--lora-r", str(RANK), "--device", "cpu", "--framing", "cloze", "--quiet"]) == 0
    results = []
    for flag in ("1", "0", "2"):
        assert main(["evaluate", str(run), "--task", f"jsonl:{task}", "--samples", "3", "--sample-batch", flag,
                     "--batch-size", "3", "--quiet"]) == 0
        out = run / "eval" / "jsonl-arith"
        metrics = json.loads((out / "metrics.json").read_text())
        for cost in ("seconds", "peak_memory_bytes"):  # measurements of the run, not of the predictive (the
            metrics.pop(cost)  # process's peak RSS rises when a batched forward is the largest it has made)
        lines = (out / "predictions.jsonl").read_text().splitlines()
        probs = torch.tensor([json.loads(line)["probs"] for line in lines])
        results.append((metrics, probs))
    for metrics, probs in results[1:]:
        assert metrics.keys() == results[0][0].keys()
        for key, value in metrics.items():
            same = value == results[0][0][key] if isinstance(value, str) else value == pytest.approx(
                results[0][0][key], abs=1e-5)
            assert same, key
        torch.testing.assert_close(probs, results[0][1], atol=ATOL, rtol=0)
    assert results[0][0]["mean_mutual_information"] > 0
    assert main(["evaluate", str(run), "--task", f"jsonl:{task}", "--sample-batch", "-1", "--quiet"]) == 2
