"""`uqlora mix`: the ensemble predictive from the members' evaluations, against a brute-force oracle over every
draw, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uqlora.cli import main
from uqlora.errors import UqloraError
from uqlora.evaluation.metrics import classification_metrics, mutual_information, predictive_entropy
from uqlora.mix import mix_evaluations

N_CHOICES = [4, 4, 3, 5, 2, 4]  # questions with different numbers of choices


def draws(seed: int, n_draws: int) -> list[torch.Tensor]:
    """Per question, n_draws probability vectors [S, C_q] (a member's posterior draws)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(2 * torch.randn(n_draws, c, generator=g, dtype=torch.float64), dim=-1) for c in N_CHOICES]


def write_member(folder: Path, member_draws: list[torch.Tensor], method: str = "swag", **changes) -> Path:
    """An evaluation folder as `uqlora evaluate` writes it: per question the mean of the draws, its entropy and
    (S > 1) the mutual information; metrics.json with the fields mix compares."""
    folder.mkdir(parents=True)
    n_draws = member_draws[0].shape[0]
    rows = []
    for q, d in enumerate(member_draws):
        mean = d.mean(dim=0)
        row = {"id": f"q{q}", "label": q % 2, "probs": mean.tolist(), "entropy": float(predictive_entropy(mean))}
        if n_draws > 1:
            row["mutual_information"] = float(mutual_information(d[:, None, :])[0])
        rows.append(row)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"task": "obqa", "split": "test", "n_bins": 5, "framing": "cloze", "method": method,
               "n_samples": n_draws, "n": len(rows), "seconds": 2.5, "peak_memory_bytes": 100 + len(str(folder)),
               "peak_memory_measure": "process_max_rss", **changes}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_mix_equals_the_mixture_of_every_draw(tmp_path):
    """Two members with 3 draws each: the mixed probabilities are the mean of all 6 draws, its mutual information
    H(mean) − mean over the 6 draws of H(draw), and its metrics classification_metrics of that mean."""
    members = [draws(0, 3), draws(1, 3)]
    folders = [write_member(tmp_path / f"m{i}", d) for i, d in enumerate(members)]
    metrics = mix_evaluations(folders, tmp_path / "mix")
    rows = [json.loads(line) for line in (tmp_path / "mix" / "predictions.jsonl").read_text().splitlines()]
    width = max(N_CHOICES)
    oracle_probs = []
    for q, row in enumerate(rows):
        every = torch.cat([members[0][q], members[1][q]])  # [6, C_q]
        mean = every.mean(dim=0)
        mi = predictive_entropy(mean) - predictive_entropy(every).mean()
        assert row["probs"] == pytest.approx(mean.tolist(), abs=1e-12)
        assert row["mutual_information"] == pytest.approx(float(mi), abs=1e-12)
        assert row["entropy"] == pytest.approx(float(predictive_entropy(mean)), abs=1e-12)
        oracle_probs.append(torch.nn.functional.pad(mean, (0, width - len(mean))))
    labels = torch.tensor([q % 2 for q in range(len(N_CHOICES))])
    expected = classification_metrics(torch.stack(oracle_probs), labels, n_bins=5)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert (metrics["method"], metrics["members"], metrics["n_samples"]) == ("multiswag", 2, 6)
    assert metrics["seconds"] == 5.0 and metrics["peak_memory_bytes"] == max(100 + len(str(f)) for f in folders)
    assert metrics["mixed_from"] == [str(f) for f in folders]
    assert json.loads((tmp_path / "mix" / "metrics.json").read_text()) == metrics


def test_deterministic_members_make_an_ensemble(tmp_path):
    """Three map evaluations (one draw, no mutual information in their rows): the ensemble's mutual information is
    the members' disagreement, H(mean) − mean H(member); without one member's seconds the mix records none."""
    members = [draws(seed, 1) for seed in (3, 4, 5)]
    folders = [write_member(tmp_path / f"m{i}", d, method="map", **({"seconds": None} if i == 1 else {}))
               for i, d in enumerate(members)]
    assert main(["mix", *map(str, folders), "--out", str(tmp_path / "ens")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ens" / "predictions.jsonl").read_text().splitlines()]
    for q, row in enumerate(rows):
        every = torch.cat([m[q] for m in members])  # [3, C_q]
        expected = predictive_entropy(every.mean(dim=0)) - predictive_entropy(every).mean()
        assert row["mutual_information"] == pytest.approx(float(expected), abs=1e-12)
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert (metrics["method"], metrics["n_samples"]) == ("ensemble", 3) and "seconds" not in metrics


@pytest.mark.parametrize("change, message", [
    ({"n_samples": 2}, "differs from .* in n_samples 2 \\(not 3\\)"),
    ({"task": "arc-c"}, "in task 'arc-c'"),
    ({"method": "map"}, "in method 'map'"),
])
def test_members_that_differ_are_refused(tmp_path, change, message):
    first = write_member(tmp_path / "a", draws(0, 3))
    second = write_member(tmp_path / "b", draws(1, 3), **change)
    with pytest.raises(UqloraError, match=message):
        mix_evaluations([first, second], tmp_path / "mix")
    assert not (tmp_path / "mix").exists()


def test_other_questions_duplicates_and_missing_files_are_refused(tmp_path, capsys):
    first = write_member(tmp_path / "a", draws(0, 3))
    second = write_member(tmp_path / "b", draws(1, 3))
    rows = (second / "predictions.jsonl").read_text().splitlines()
    swapped = rows[:2] + [rows[3], rows[2]] + rows[4:]
    (second / "predictions.jsonl").write_text("\n".join(swapped) + "\n")
    with pytest.raises(UqloraError, match=r"b/predictions.jsonl line 3 is question \('q3'.* not the same questions"):
        mix_evaluations([first, second], tmp_path / "mix")
    with pytest.raises(UqloraError, match="given twice"):
        mix_evaluations([first, first], tmp_path / "mix")
    (second / "metrics.json").unlink()
    assert main(["mix", str(first), str(second), "--out", str(tmp_path / "mix")]) != 0
    assert "b/metrics.json is missing" in capsys.readouterr().err
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "mine.txt").write_text("keep")
    with pytest.raises(UqloraError, match="already exists and is not empty"):
        mix_evaluations([first, write_member(tmp_path / "c", draws(2, 3))], tmp_path / "mix")
    assert [p.name for p in (tmp_path / "mix").iterdir()] == ["mine.txt"]
