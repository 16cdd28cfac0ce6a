"""`uqlora sft` on the tiny random-init Llama with the real SmolLM2 tokenizer and chat template: labels, the fused
label-smoothed loss, packing, sft -> evaluate round trips (LoRA and full fine-tuning), bit-exact resume, bad input,
and reading the real LIMA file (read only: no training on it here)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from uqlora.cli import build_parser, main
from uqlora.config import resolve
from uqlora.errors import UqloraError
from uqlora.evaluate import EvalOptions, evaluate
from uqlora.evaluation.compare import collect_rows
from uqlora.sft import SftConfig, sft
from uqlora.sft.data import Conversation, instruction_messages, load_conversations, read_rows, to_conversation
from uqlora.sft.encode import IGNORE, collate, encode, encode_all, pack
from uqlora.sft.loss import sft_loss

from conftest import SHARED_DATA, Interrupt, stop_at, tiny_llama, write_jsonl_task
from test_errors import run_cli

SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n")
LIMA = SHARED_DATA / "sft" / "lima.json.gz"


def chat_rows(n: int) -> list[dict]:
    """Short arithmetic conversations: every third has an earlier turn, every fourth an instruction row."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        if i % 4 == 3:
            rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b), "history": []})
            continue
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        rows.append({"messages": messages})
    return rows


def conversations(n: int) -> list[Conversation]:
    return [to_conversation(f"row {i}", row) for i, row in enumerate(chat_rows(n), 1)]


@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(12)))
    return path


def sft_config(model_dir, data, **kw) -> SftConfig:
    base = dict(model=str(model_dir), data=str(data), batch_size=4, lr=5e-3, lora_r=4, lora_dropout=0.0,
                device="cpu", max_length=64, epochs=1)
    return SftConfig(**{**base, **kw}).validate()


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


# ---- labels ----

def test_labels_hand_computed_multi_turn(tokenizer):
    """Oracle: the SmolLM2 chat format written out by hand, piece by piece (system prompt, user and assistant
    headers); only the two assistant replies with their `<|im_end|>\\n` carry labels, multi-turn included."""
    row = {"instruction": "Q2", "input": "ctx", "output": "A2", "history": [["Hi", "Hello there"]]}
    pieces = [(SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
              ("Hello there<|im_end|>\n", True),
              ("<|im_start|>user\nQ2\nctx<|im_end|>\n<|im_start|>assistant\n", False),
              ("A2<|im_end|>\n", True)]
    expected_ids, expected_labels = [], []
    for text, labelled in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if labelled else [IGNORE] * len(ids)
    ids, labels = encode(tokenizer, Conversation("row", instruction_messages(row)))
    assert ids == expected_ids and labels == expected_labels
    assert labelled_text(tokenizer, ids, labels) == "Hello there<|im_end|>\nA2<|im_end|>\n"


def test_labels_cover_a_token_merged_across_the_header(tokenizer):
    """Oracle: the hand-written format again, for a reply starting with a blank line (as many LIMA answers do):
    SmolLM2 merges the header's final "\n" with the reply's first into one "\n\n" token, which is labelled, so
    every reply character is covered; everything before it is not."""
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nA"}]
    ids, labels = encode(tokenizer, Conversation("row", messages))
    n = labels.index(next(label for label in labels if label != IGNORE))  # first labelled token
    assert tokenizer.decode(ids[n]) == "\n\n"  # the merge this test is about
    assert tokenizer.decode(ids[:n]) == SMOL_SYSTEM + "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant"
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
    assert labelled_text(tokenizer, ids, labels) == "\n\n\nA<|im_end|>\n"


def test_labels_chat_rows_with_system(tokenizer):
    """Oracle: a given system turn replaces the template's default one and is never labelled; each assistant
    turn is labelled exactly (decoded text), the user turns are not."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                {"role": "assistant", "content": "2"}]
    ids, labels = encode(tokenizer, Conversation("row", messages))
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert labelled_text(tokenizer, ids, labels) == "1<|im_end|>\n2<|im_end|>\n"


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    """A template that renders an assistant turn differently once later turns exist cannot be labelled from
    prefixes: a UqloraError naming the row, not silently wrong labels."""
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[hidden]"
                         "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(UqloraError, match="my.jsonl, line 4.*turn 1"):
        encode(tok, Conversation("my.jsonl, line 4", messages))


def test_truncation_keeps_the_beginning_and_drops_empty_examples(tokenizer):
    """Oracle: the untruncated encoding. max_length keeps the first tokens; an example whose response starts
    beyond max_length has no labelled token left and is dropped (and counted)."""
    long = Conversation("a", [{"role": "user", "content": "Say many words."},
                              {"role": "assistant", "content": "word " * 50}])
    prompt_heavy = Conversation("b", [{"role": "user", "content": "context " * 40},
                                      {"role": "assistant", "content": "ok"}])
    full_ids, full_labels = encode(tokenizer, long)
    examples, dropped = encode_all(tokenizer, [long, prompt_heavy], max_length=40)
    assert dropped == 1 and len(examples) == 1
    assert examples[0].ids == full_ids[:40] and examples[0].labels == full_labels[:40]
    assert examples[0].positions == list(range(40))


# ---- the loss ----

@pytest.mark.parametrize("eps, temperature, softcap", [(0.0, 1.0, None), (0.1, 1.0, None), (0.1, 0.7, 3.0)])
def test_fused_loss_matches_naive(tokenizer, eps, temperature, softcap):
    """Oracle: F.cross_entropy on the model's own shifted logits, divided by T then softcapped, with PyTorch's
    label smoothing; loss and every parameter gradient of the tiny model (tied head) agree."""
    model = tiny_llama(tokenizer).double()
    convs = conversations(3)
    examples, _ = encode_all(tokenizer, convs, max_length=64)
    batch = collate(examples, tokenizer.pad_token_id, False, "cpu")  # padded: the shorter rows have pad tokens

    fused = sft_loss(model, batch, label_smoothing=eps, temperature=temperature, softcap=softcap)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    naive = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                            ignore_index=IGNORE, label_smoothing=eps, reduction="sum")
    naive_grads = torch.autograd.grad(naive, list(model.parameters()))
    torch.testing.assert_close(fused, naive, rtol=1e-10, atol=1e-10)
    for a, b in zip(fused_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_packing_matches_separate_examples(tokenizer):
    """Oracle: each example run alone. A packed row (examples concatenated, positions restarting) gives the sum
    of their losses, so no token attends across examples; with positions 0..L-1 instead it would not."""
    model = tiny_llama(tokenizer)
    convs = conversations(6)
    examples, _ = encode_all(tokenizer, convs, max_length=64)
    rows = pack(examples, 128)
    assert len(rows) < len(examples) and all(len(r.ids) <= 128 for r in rows)
    with torch.no_grad():
        separate = sum(sft_loss(model, collate([e], tokenizer.pad_token_id, False, "cpu")) for e in examples)
        batch = collate(rows, tokenizer.pad_token_id, True, "cpu")
        packed = sft_loss(model, batch)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky = sft_loss(model, batch)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-3)  # a sum of ~600: float32 rounding
    assert (leaky - separate).abs() > 1e-2  # the tiny random model attends weakly, but measurably


# ---- runs ----

def test_sft_lora_evaluate_round_trip(tmp_path, tiny_model_dir, sft_data):
    """Oracle: the run-directory contract. A LoRA sft run holds a plain PEFT adapter that training moved, a
    config.yaml with method sft, one log line per step; `evaluate` scores it on a multiple-choice task."""
    task = write_jsonl_task(tmp_path / "arith.jsonl", 8)
    run = sft(sft_config(tiny_model_dir, sft_data, epochs=2, batch_size=6, label_smoothing=0.1), tmp_path / "run",
              quiet=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "sft" and config["label_smoothing"] == 0.1 and config["model"] == str(tiny_model_dir)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [1, 1, 2, 2]
    assert not (run / "checkpoint").exists()
    lora_b = [v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    metrics = evaluate(run, EvalOptions(task=f"jsonl:{task}", quiet=True))
    assert metrics["n"] == 8 and metrics["method"] == "sft"
    assert (run / "eval" / "jsonl-arith" / "metrics.json").is_file()
    assert [r["method"] for r in collect_rows([run])] == ["sft ls=0.1"]  # compare tells smoothings apart


def test_sft_full_finetune_evaluate_round_trip(tmp_path, capsys, tiny_model_dir, sft_data):
    """Oracle: the base model's weights and `uqlora evaluate` on RUN/model directly. Full fine-tuning writes
    RUN/model (weights changed, tokenizer with its chat template), config.yaml points `model` at it
    (`base_model`: the original); evaluating the run equals evaluating that folder zero-shot, even after the
    run directory moved; `uqlora train --method sft-full` is refused."""
    from transformers import AutoModelForCausalLM

    task = write_jsonl_task(tmp_path / "arith.jsonl", 8)
    run = sft(sft_config(tiny_model_dir, sft_data, full_finetune=True, lr=1e-3, max_steps=2, packing=True),
              tmp_path / "run", quiet=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "sft-full" and config["base_model"] == str(tiny_model_dir)
    assert config["model"] == str((run / "model").resolve())
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "chat_template.jinja").is_file()
    assert not (run / "adapter").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    moved = shutil.move(run, tmp_path / "moved")
    metrics = evaluate(moved, EvalOptions(task=f"jsonl:{task}", quiet=True))
    assert main(["evaluate", "--model", str(moved / "model"), "--out", str(tmp_path / "zs"), "--task",
                 f"jsonl:{task}", "--framing", "cloze", "--quiet"]) == 0
    direct = json.loads((tmp_path / "zs" / "eval" / "jsonl-arith" / "metrics.json").read_text())
    assert metrics["nll"] == pytest.approx(direct["nll"], rel=1e-6) and metrics["method"] == "sft-full"

    msg = run_cli(capsys, "train", "--model", tiny_model_dir, "--task", f"jsonl:{task}", "--method", "sft-full",
                  "--out", tmp_path / "t", "--device", "cpu", "--quiet")
    assert "uqlora sft" in msg and not (tmp_path / "t").exists()


def test_resume_matches_uninterrupted(tmp_path, tiny_model_dir, sft_data):
    """Oracle: an uninterrupted run with the same seed. Interrupted after step 3 (checkpoint every 2 steps,
    mid-epoch, packed rows, LoRA dropout on so the restored RNG matters) and resumed: the same adapter, bit for
    bit, and the same log."""
    cfg = sft_config(tiny_model_dir, sft_data, batch_size=1, max_steps=4, save_every=2, lora_dropout=0.1,
                     packing=True, max_length=96, seed=3, label_smoothing=0.1)
    whole = sft(cfg, tmp_path / "whole", quiet=True)


    with pytest.raises(Interrupt):
        sft(cfg, tmp_path / "cut", quiet=True, step_hook=stop_at(3))
    assert (tmp_path / "cut" / "checkpoint").is_dir() and not (tmp_path / "cut" / "adapter").exists()
    assert main(["sft", "--out", str(tmp_path / "cut"), "--resume", "--quiet"]) == 0
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "train_log.jsonl").read_text() == (tmp_path / "cut" / "train_log.jsonl").read_text()


# ---- bad input ----

def sft_argv(model_dir, data, out, *extra):
    return [str(a) for a in ("sft", "--model", model_dir, "--data", data, "--out", out, "--device", "cpu",
                             "--max-steps", "1", "--quiet", *extra)]


@pytest.mark.parametrize("row, where, field", [
    ('{"instruction": "q", "input": ""}', "line 3", "'output'"),
    ('{"instruction": "q", "output": "a", "history": [["only user"]]}', "line 3", "'history' item 0"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}', "line 3", "messages[1].role"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "line 3", "no assistant turn"),
    ('{"prompt": "q", "completion": "a"}', "line 3", "'messages'"),
    ('{"messages": [', "line 3", "malformed JSON"),
])
def test_bad_rows(capsys, tmp_path, tiny_model_dir, row, where, field):
    """Oracle: the row we broke. One `error:` line naming the file, the row and the field; no run directory."""
    lines = [json.dumps(r) for r in chat_rows(4)]
    lines[2] = row
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    msg = run_cli(capsys, *sft_argv(tiny_model_dir, path, tmp_path / "run"))
    assert str(path) in msg and where in msg and field in msg
    assert not (tmp_path / "run").exists()


def test_bad_row_in_json_array(tmp_path):
    """Oracle: the broken element; in a (gzip'd) JSON array rows are numbered from 1."""
    import gzip

    rows = chat_rows(3)
    del rows[1]["messages"]
    rows[1]["instruction"] = 7
    path = tmp_path / "bad.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(rows, f)
    with pytest.raises(UqloraError, match=r"bad.json.gz, row 2: field 'instruction' must be a string"):
        load_conversations(path)


def test_missing_file_and_no_chat_template(capsys, tmp_path, tiny_model_dir, sft_data, tokenizer):
    """Oracle: the cause. A missing data file, and a model whose tokenizer has no chat template (the message
    says how to give one), fail with one line and leave nothing behind; --chat-template then makes it work."""
    msg = run_cli(capsys, *sft_argv(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "run"))
    assert "nope.jsonl" in msg and "not found" in msg and not (tmp_path / "run").exists()

    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    msg = run_cli(capsys, *sft_argv(bare, sft_data, tmp_path / "run"))
    assert "no chat template" in msg and "--chat-template" in msg and not (tmp_path / "run").exists()

    (tmp_path / "t.jinja").write_text(tokenizer.chat_template)
    assert main(sft_argv(bare, sft_data, tmp_path / "run", "--chat-template", tmp_path / "t.jinja")) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_config_file_flags_and_validation(tmp_path):
    """Oracle: the precedence rule of uqlora.config (defaults < YAML < flags), bools from YAML and flags."""
    path = tmp_path / "c.yaml"
    path.write_text("data: x.jsonl\nlabel-smoothing: 0.1\npacking: true\nlr: 1e-4\nmax_length: 256\n")
    args = build_parser().parse_args(["sft", "--out", "o", "--config", str(path), "--max-length", "128",
                                      "--no-packing", "--full-finetune"])
    flags = {k: v for k, v in vars(args).items() if k not in {"command", "out", "config", "resume", "quiet"}}
    config = resolve(str(path), flags, SftConfig)
    assert config.label_smoothing == 0.1 and config.lr == 1e-4 and config.max_length == 128
    assert config.packing is False and config.full_finetune is True and config.method == "sft-full"
    with pytest.raises(UqloraError, match="data is required"):
        SftConfig().validate()
    with pytest.raises(UqloraError, match="label_smoothing"):
        SftConfig(data="x", label_smoothing=1.0).validate()


# ---- the real data ----

@pytest.mark.skipif(not LIMA.is_file(), reason="LIMA not present in ../shared/data/sft")
def test_reads_lima():
    """Oracle: SOURCES.md: 1,029 rows, 1,000 single-turn and 29 multi-turn, each multi-turn row's history
    pairs becoming earlier user/assistant turns."""
    rows = read_rows(LIMA)
    conversations = load_conversations(LIMA)
    assert len(rows) == len(conversations) == 1029
    multi = [(row, c) for (_, row), c in zip(rows, conversations) if row["history"]]
    assert len(multi) == 29
    for row, c in multi:
        assert len(c.messages) == 2 * len(row["history"]) + 2
        assert c.messages[1]["content"] == row["history"][0][1] and c.messages[-1]["content"] == row["output"]
    assert rows[0][0] == f"{LIMA}, row 1"
    assert len(load_conversations(LIMA, max_examples=50)) == 50


def test_non_finite_loss(tmp_path, monkeypatch, tiny_model_dir, sft_data):
    """Oracle: a loss forced to nan. Training stops with a UqloraError naming the step; no run directory."""
    import uqlora.sft.train as sft_train

    real = sft_train.sft_loss
    monkeypatch.setattr(sft_train, "sft_loss", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(UqloraError, match="non-finite training loss.*step 1"):
        sft(sft_config(tiny_model_dir, sft_data, max_steps=2), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
