"""OOD detection (uqlora.evaluation.ood): AUROC and AUPR against scikit-learn, ood_report on predictions files
written by hand, and `uqlora ood` through the real CLI entry point (exit 0 and files written; exit 2 and one
`error: ...` line on bad input)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from uqlora.cli import main
from uqlora.errors import UqloraError
from uqlora.evaluation.ood import aupr, auroc, ood_report

SEEDS = range(5)
N_LEVELS = 4  # scores drawn from this many values, so ties are frequent


def sklearn_pair(neg, pos):
    """Labels (1 = OOD positive) and scores in the form sklearn takes."""
    return np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_sklearn_on_random_tied_scores(seed):
    """Random integer-valued scores (many ties), unequal class sizes: AUROC equals roc_auc_score and AUPR
    equals average_precision_score to float64 rounding."""
    rng = np.random.default_rng(seed)
    neg = rng.integers(0, N_LEVELS, size=rng.integers(1, 40)).astype(float)
    pos = (rng.integers(0, N_LEVELS, size=rng.integers(1, 40)) + rng.integers(0, 2)).astype(float)
    y, s = sklearn_pair(neg, pos)
    assert auroc(neg, pos) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(neg, pos) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_sklearn_on_continuous_scores(seed):
    """Continuous Gaussian scores (no ties), positives shifted up: both metrics equal scikit-learn's."""
    rng = np.random.default_rng(seed)
    neg, pos = rng.normal(size=50), rng.normal(loc=0.7, size=30)
    y, s = sklearn_pair(neg, pos)
    assert auroc(neg, pos) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(neg, pos) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_all_equal_and_perfectly_separated_scores():
    """All scores equal: AUROC ½ and AUPR the positive fraction (sklearn agrees); positives all above: 1 and 1;
    positives all below: AUROC 0 and AUPR equal to sklearn's."""
    neg, pos = np.full(7, 0.3), np.full(3, 0.3)
    y, s = sklearn_pair(neg, pos)
    assert auroc(neg, pos) == roc_auc_score(y, s) == 0.5
    assert aupr(neg, pos) == pytest.approx(average_precision_score(y, s)) and aupr(neg, pos) == pytest.approx(0.3)
    neg, pos = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.9])
    assert auroc(neg, pos) == 1.0 and aupr(neg, pos) == 1.0
    y, s = sklearn_pair(pos, neg)  # swapped: positives are the low scores
    assert auroc(pos, neg) == 0.0 == roc_auc_score(y, s)
    assert aupr(pos, neg) == pytest.approx(average_precision_score(y, s))


def test_two_plus_two_by_hand():
    """neg [0.1, 0.4], pos [0.35, 0.8]: of the 4 (pos, neg) pairs 3 are ordered, AUROC 3/4. Thresholds 0.8, 0.4,
    0.35, 0.1 give (R, P) = (½, 1), (½, ½), (1, ⅔), (1, ½): AP = ½·1 + 0 + ½·⅔ + 0 = 5/6. A tie: neg [0.2, 0.5],
    pos [0.5, 0.9] has 3 ordered pairs and 1 tie, AUROC 3.5/4; thresholds 0.9, 0.5, 0.2 give (½, 1), (1, ⅔),
    (1, ½): AP = ½ + ½·⅔ = 5/6."""
    assert auroc([0.1, 0.4], [0.35, 0.8]) == 0.75
    assert aupr([0.1, 0.4], [0.35, 0.8]) == pytest.approx(5 / 6, abs=1e-15)
    assert auroc([0.2, 0.5], [0.5, 0.9]) == 3.5 / 4
    assert aupr([0.2, 0.5], [0.5, 0.9]) == pytest.approx(5 / 6, abs=1e-15)


def test_bad_scores_raise():
    """Empty, non-finite and 2-D scores raise UqloraError naming the argument."""
    with pytest.raises(UqloraError, match="scores_neg"):
        auroc([], [0.5])
    with pytest.raises(UqloraError, match=r"scores_pos holds a non-finite score at index 1"):
        aupr([0.1], [0.5, math.nan])
    with pytest.raises(UqloraError, match="1-D"):
        auroc([[0.1]], [0.5])


# ---------------------------------------------------------------------------------------------- ood_report

IN_ROWS = [  # obqa: confident, low entropy
    {"id": "a", "label": 0, "probs": [0.9, 0.05, 0.05], "entropy": 0.39, "mutual_information": 0.01},
    {"id": "b", "label": 1, "probs": [0.2, 0.7, 0.1], "entropy": 0.80, "mutual_information": 0.05},
]
OOD_ROWS = [  # arc-c: less confident, higher entropy
    {"id": "c", "label": 2, "probs": [0.3, 0.3, 0.4], "entropy": 1.09, "mutual_information": 0.20},
    {"id": "d", "label": 0, "probs": [0.6, 0.2, 0.2], "entropy": 0.95, "mutual_information": 0.03},
    {"id": "e", "label": 3, "probs": [0.25, 0.25, 0.25, 0.25], "entropy": 1.39, "mutual_information": 0.30},
]


def write_predictions(run, task, rows, drop=()):
    """RUN/eval/TASK/predictions.jsonl from `rows` without the keys `drop`, as evaluate writes it."""
    path = run / "eval" / task / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in drop}) + "\n" for r in rows))
    return path


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "swag-s0"
    write_predictions(run, "obqa", IN_ROWS)
    write_predictions(run, "arc-c", OOD_ROWS)
    return run


def test_ood_report_values_by_hand(run):
    """Oracle: the pairwise counts by hand. entropy: every OOD score > every in score, AUROC 1; max_prob
    (1 − max p) in [0.1, 0.3] vs OOD [0.6, 0.4, 0.75]: AUROC 1; mutual_information in [0.01, 0.05] vs OOD
    [0.20, 0.03, 0.30]: 0.03 beats 0.01 only, AUROC 5/6, and AP (thresholds 0.3, 0.2, 0.05, 0.03) = ⅓ + ⅓ +
    ⅓·¾ = 11/12."""
    report = ood_report(run, "obqa", ["arc-c"])
    assert (report["run"], report["in_task"], report["split"]) == ("swag-s0", "obqa", "test")
    res = report["ood"]["arc-c"]
    assert (res["n_in"], res["n_ood"]) == (2, 3)
    assert list(res["scores"]) == ["entropy", "mutual_information", "max_prob"]
    assert res["scores"]["entropy"] == {"auroc": 1.0, "aupr": 1.0}
    assert res["scores"]["max_prob"] == {"auroc": 1.0, "aupr": 1.0}
    assert res["scores"]["mutual_information"]["auroc"] == pytest.approx(5 / 6)
    assert res["scores"]["mutual_information"]["aupr"] == pytest.approx(11 / 12)


def test_ood_report_without_mutual_information(run):
    """A deterministic method's OOD file has no mutual_information: the score is left out, the others stay."""
    write_predictions(run, "arc-c", OOD_ROWS, drop=("mutual_information",))
    res = ood_report(run, "obqa", ["arc-c"])["ood"]["arc-c"]
    assert list(res["scores"]) == ["entropy", "max_prob"]


def test_ood_report_errors(run):
    """Missing file names the evaluate command (with --split off test); malformed JSON, a non-finite score and
    mutual_information on some lines only name the file and line; the in-task cannot be its own OOD task."""
    with pytest.raises(UqloraError, match=r"does not exist: run `uqlora evaluate \S*swag-s0 --task sciq`"):
        ood_report(run, "obqa", ["sciq"])
    with pytest.raises(UqloraError, match=r"--task obqa --split validation`"):
        ood_report(run, "obqa", ["arc-c"], split="validation")
    with pytest.raises(UqloraError, match="differ from the in-task"):
        ood_report(run, "obqa", ["obqa"])
    path = write_predictions(run, "arc-c", OOD_ROWS)
    path.write_text(path.read_text().replace('"entropy": 0.95', '"entropy": NaN'))
    with pytest.raises(UqloraError, match=r"arc-c/predictions.jsonl line 2: `entropy` is not finite"):
        ood_report(run, "obqa", ["arc-c"])
    path.write_text(path.read_text().replace("NaN", "0.95").replace('{"id": "e"', '{"id" "e"'))
    with pytest.raises(UqloraError, match=r"predictions.jsonl line 3 is not valid JSON"):
        ood_report(run, "obqa", ["arc-c"])
    write_predictions(run, "arc-c", [*OOD_ROWS, {**OOD_ROWS[0], "mutual_information": None}])
    with pytest.raises(UqloraError, match=r"line 4: `mutual_information` must be a number"):
        ood_report(run, "obqa", ["arc-c"])
    write_predictions(run, "arc-c", OOD_ROWS[:2] + [{k: v for k, v in OOD_ROWS[2].items() if k != "entropy"}])
    with pytest.raises(UqloraError, match=r"line 3: `entropy` must be a number, got null"):
        ood_report(run, "obqa", ["arc-c"])


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_markdown(run, capsys):
    """`uqlora ood RUN --in-task obqa --ood-task arc-c` exits 0, prints the table and writes
    eval/ood-obqa.json (the report, read back equal to ood_report) and eval/ood-obqa.md."""
    assert main(["ood", str(run), "--in-task", "obqa", "--ood-task", "arc-c"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ood", "task", "n_in", "n_ood", "score", "AUROC", "(%)", "AUPR", "(%)"]
    assert out[2].split() == ["arc-c", "2", "3", "mutual_information", "83.3", "91.7"]
    assert json.loads((run / "eval" / "ood-obqa.json").read_text()) == ood_report(run, "obqa", ["arc-c"])
    md = (run / "eval" / "ood-obqa.md").read_text().splitlines()
    assert md[0] == "| ood task | n_in | n_ood | score | AUROC (%) | AUPR (%) |"
    assert md[2] == "| arc-c | 2 | 3 | entropy | 100.0 | 100.0 |" and len(md) == 5
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["arc-c", "obqa", "ood-obqa.json", "ood-obqa.md"]


def cli_error(capsys, *argv) -> str:
    """Run `uqlora ARGV`, assert exit 2 with a single `error: ...` line, return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def test_cli_errors(run, capsys):
    """Missing predictions → exit 2 naming the evaluate command; a malformed line → exit 2 naming file and
    line; nothing written in either case."""
    err = cli_error(capsys, "ood", run, "--in-task", "obqa", "--ood-task", "arc-c", "sciq")
    assert f"run `uqlora evaluate {run} --task sciq` first" in err
    (run / "eval" / "obqa" / "predictions.jsonl").write_text(json.dumps(IN_ROWS[0]) + "\n[1, 2]\n")
    err = cli_error(capsys, "ood", run, "--in-task", "obqa", "--ood-task", "arc-c")
    assert "obqa/predictions.jsonl line 2 must hold a JSON object" in err
    assert not list((run / "eval").glob("ood-*"))
