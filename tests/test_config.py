"""One definition: dataclass defaults < YAML file < command-line flags; the saved config reproduces the run."""

from __future__ import annotations

import pytest
import yaml

from uqlora.cli import build_parser
from uqlora.config import TrainConfig, dump_yaml, from_mapping, resolve
from uqlora.errors import UqloraError


def flags(*argv) -> dict:
    args = build_parser().parse_args(["train", "--out", "x", *argv])
    return {k: v for k, v in vars(args).items() if k not in {"command", "out", "config", "resume", "quiet"}}


def test_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nepochs: 4\nlora-targets: [q_proj, k_proj]\nbatch_size: 16\n")
    config = resolve(str(path), flags("--epochs", "7", "--lora-r", "2"))
    assert config.lr == 3e-4 and isinstance(config.lr, float)  # YAML's "3e-4" string becomes a float
    assert config.epochs == 7  # flag beats file
    assert config.batch_size == 16  # file beats default
    assert config.lora_r == 2 and config.lora_targets == ["q_proj", "k_proj"]
    assert config.lora_alpha == TrainConfig().lora_alpha  # default


def test_every_field_has_a_flag():
    parser_flags = flags("--lora-targets", "q_proj", "--max-examples", "5", "--data-dir", "d")
    assert set(parser_flags) == {"lora_targets", "max_examples", "data_dir"}
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text


def test_saved_config_round_trip():
    config = TrainConfig(task="arc-e", lr=1e-4, lora_targets=["q_proj"]).validate()
    assert from_mapping(yaml.safe_load(dump_yaml(config.to_dict())), "saved") == config


@pytest.mark.parametrize("values, message", [
    ({"epochs": 0}, "epochs must be > 0"),
    ({"epochs": 1.5}, "epochs must be int"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"framing": "mc"}, "framing"),
    ({"lora_targets": []}, "lora_targets"),
    ({"lr": "fast"}, "lr must be float"),
])
def test_invalid_values(values, message):
    with pytest.raises(UqloraError, match=message):
        from_mapping(values, "test")


def test_yaml_booleans_for_text_options(tmp_path):
    """`clora_context: off` unquoted is YAML 1.1's False: a clear error asking for quotes, not the text "False";
    quoted, it is read as written."""
    path = tmp_path / "c.yaml"
    path.write_text("method: clora\nclora_context: off\n")
    with pytest.raises(UqloraError, match="write it in quotes"):
        resolve(str(path), {})
    path.write_text("method: clora\nclora_context: 'off'\n")
    assert resolve(str(path), {}).clora_context == "off"
