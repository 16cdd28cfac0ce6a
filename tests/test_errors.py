"""Bad input through the real CLI entry point: one line `error: ...` naming the problem, exit status 2,
and nothing half-written (no run directory left behind, no partial eval folder)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from uqlora.cli import main
from uqlora.train import train

from conftest import Interrupt, stop_at, write_jsonl_task
from test_train import config_for


def run_cli(capsys, *argv) -> str:
    """Run `uqlora ARGV`, assert exit 2 with a single error line, return that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def train_argv(model_dir, task, out, *extra):
    return ["train", "--model", model_dir, "--task", task, "--out", out, "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--framing", "cloze", "--quiet", *extra]


def bad_row_file(tmp_path, row: str, line_no: int = 3):
    path = write_jsonl_task(tmp_path / "bad.jsonl", 6)
    lines = path.read_text().splitlines()
    lines[line_no - 1] = row
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("row, expected", [
    ('{"question": "2+2?", "choices": ["4", "5"], "answer": 0', "line 3"),  # malformed JSON
    ('{"question": "2+2?", "choices": ["4", "5"], "answer": 7}', "line 3"),  # label out of range
    ('{"question": "2+2?", "choices": [], "answer": 0}', "line 3"),  # empty choices
    ('{"choices": ["4", "5"], "answer": 0}', "line 3"),  # missing field
])
def test_bad_rows(capsys, tmp_path, tiny_model_dir, row, expected):
    path = bad_row_file(tmp_path, row)
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{path}", tmp_path / "run"))
    assert str(path) in msg and expected in msg
    assert not (tmp_path / "run").exists()


def test_unknown_task(capsys, tmp_path, tiny_model_dir):
    msg = run_cli(capsys, *train_argv(tiny_model_dir, "squad", tmp_path / "run"))
    assert "squad" in msg and "obqa" in msg
    assert not (tmp_path / "run").exists()


def test_unknown_split(capsys, tmp_path, tiny_model_dir):
    msg = run_cli(capsys, *train_argv(tiny_model_dir, "obqa", tmp_path / "run", "--split", "holdout"))
    assert "holdout" in msg
    assert not (tmp_path / "run").exists()


def test_missing_data_file(capsys, tmp_path, tiny_model_dir):
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{tmp_path}/nope.jsonl", tmp_path / "run"))
    assert "nope.jsonl" in msg
    assert not (tmp_path / "run").exists()


def test_missing_model(capsys, tmp_path, task_file):
    msg = run_cli(capsys, *train_argv(tmp_path / "no-model.gguf", f"jsonl:{task_file}", tmp_path / "run"))
    assert "no-model.gguf" in msg
    assert not (tmp_path / "run").exists()


def test_missing_and_bad_config_file(capsys, tmp_path, tiny_model_dir, task_file):
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run", "--config",
                                      tmp_path / "none.yaml"))
    assert "none.yaml" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run", "--config", bad))
    assert "learning_rate" in msg
    bad.write_text("epochs: [unclosed\n")
    assert "not valid YAML" in run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run",
                                                           "--config", bad))
    assert not (tmp_path / "run").exists()


def test_invalid_option_values(capsys, tmp_path, tiny_model_dir, task_file):
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run", "--lr", "-1"))
    assert "lr must be > 0" in msg
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run",
                                      "--lora-targets", "attn_nonexistent"))
    assert "attn_nonexistent" in msg
    assert not (tmp_path / "run").exists()


def test_non_finite_loss(capsys, monkeypatch, tmp_path, tiny_model_dir, task_file):
    """A NaN loss at the third step (injected: the tiny model survives any learning rate, its RMSNorm
    renormalises blown-up activations) stops training with the step named, and no run is left."""
    from uqlora.methods.map import MapMethod

    calls = {"n": 0}
    real_loss = MapMethod.loss

    def loss_turning_nan(self, scores, labels):
        calls["n"] += 1
        losses = real_loss(self, scores, labels)
        return losses * float("nan") if calls["n"] >= 3 else losses

    monkeypatch.setattr(MapMethod, "loss", loss_turning_nan)
    msg = run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", tmp_path / "run"))
    assert "non-finite training loss (nan) at step 3" in msg
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_and_resume_without_checkpoint(capsys, tmp_path, tiny_model_dir, task_file):
    run = tmp_path / "run"
    assert main([str(a) for a in train_argv(tiny_model_dir, f"jsonl:{task_file}", run)]) == 0
    capsys.readouterr()
    assert "already exists" in run_cli(capsys, *train_argv(tiny_model_dir, f"jsonl:{task_file}", run))
    assert "nothing to resume" in run_cli(capsys, "train", "--out", run, "--resume", "--quiet")
    assert "--lr" in run_cli(capsys, "train", "--out", run, "--resume", "--lr", "0.5")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the finished run is untouched


def test_adapter_for_another_model(capsys, tmp_path, tiny_model_dir, other_tiny_model_dir, task_file):
    run = tmp_path / "run"
    assert main([str(a) for a in train_argv(tiny_model_dir, f"jsonl:{task_file}", run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"] = str(other_tiny_model_dir)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    msg = run_cli(capsys, "evaluate", run, "--task", f"jsonl:{task_file}", "--quiet")
    assert "does not match the model" in msg
    assert not (run / "eval").exists()


def test_corrupt_checkpoint(capsys, tmp_path, tiny_model_dir, task_file):
    cfg = config_for(tiny_model_dir, task_file, save_every=2)

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", quiet=True, step_hook=stop_at(3))
    target = tmp_path / "run" / "checkpoint" / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    msg = run_cli(capsys, "train", "--out", tmp_path / "run", "--resume", "--quiet")
    assert "corrupt checkpoint" in msg and "trainable.safetensors" in msg
    assert not (tmp_path / "run" / "adapter").exists()


def test_evaluate_not_a_run(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a uqlora run directory" in run_cli(capsys, "evaluate", tmp_path / "empty", "--task", "obqa")
    assert "not found" in run_cli(capsys, "evaluate", tmp_path / "missing", "--task", "obqa")


def test_compare_missing_eval(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(json.dumps({"model": "m", "method": "map"}))
    msg = run_cli(capsys, "compare", tmp_path / "r", "--task", "obqa", "--out", tmp_path)
    assert str(tmp_path / "r") in msg
    assert not (tmp_path / "comparison.md").exists()
    shutil.rmtree(tmp_path / "r")


def test_corrupt_adapter(capsys, tmp_path, tiny_model_dir, task_file):
    run = tmp_path / "run"
    assert main([str(a) for a in train_argv(tiny_model_dir, f"jsonl:{task_file}", run)]) == 0
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    msg = run_cli(capsys, "evaluate", run, "--task", f"jsonl:{task_file}", "--quiet")
    assert "adapter" in msg and str(run / "adapter") in msg
    assert not (run / "eval").exists()


def test_zero_shot_bad_task_makes_no_run(capsys, tmp_path, tiny_model_dir):
    msg = run_cli(capsys, "evaluate", "--model", tiny_model_dir, "--out", tmp_path / "zs", "--task", "obqa",
                  "--split", "nosuch")
    assert "nosuch" in msg
    assert not (tmp_path / "zs").exists()


def test_zero_shot_missing_model_makes_no_run(capsys, tmp_path):
    msg = run_cli(capsys, "evaluate", "--model", tmp_path / "nomodel.gguf", "--out", tmp_path / "zs", "--task", "obqa")
    assert "nomodel.gguf" in msg
    assert not (tmp_path / "zs").exists()


def test_result_lines_printed_by_the_main_process_only(capsys, monkeypatch):
    """Under torchrun every process runs the command; only RANK 0 prints its result line (errors: all)."""
    from uqlora.cli import say

    monkeypatch.setenv("RANK", "1")
    say("evaluated")
    monkeypatch.setenv("RANK", "0")
    say("trained")
    monkeypatch.delenv("RANK")
    say("fitted")
    assert capsys.readouterr().out.splitlines() == ["trained", "fitted"]
