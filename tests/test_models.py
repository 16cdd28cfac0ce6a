"""Model resolution and loading: aliases, the GGUF conversion cache, local folders, hub ids, dtype/device."""

from __future__ import annotations

import pytest
import torch

from conftest import pretend_cpu
from uqlora.errors import UqloraError
from uqlora.models import (_CONVERTED_MARKER, add_lora, convert_gguf, cpu_bf16_warning, default_framing, load_model,
                           pick_dtype, resolve_model)


def test_alias_resolves_to_packaged_gguf():
    source = resolve_model("smollm2-135m")
    assert source.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.gguf_file.is_file()
    assert source.default_framing == "cloze"


def test_gguf_converted_once_and_reused(smollm2_dir):
    """The conversion folder is marked complete and a second call returns it without converting again."""
    assert (smollm2_dir / _CONVERTED_MARKER).is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(resolve_model("smollm2-135m").gguf_file, quiet=True) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_real_smollm2_loads_from_cache(smollm2_dir):
    """SmolLM2-135M: 30 layers, hidden 576, vocab 49,152, ~134.5M parameters, tied embeddings, fp32 on CPU."""
    model, tokenizer = load_model("smollm2-135m", quiet=True)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id is not None
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert default_framing("smollm2-135m", model) == "cloze"


def test_local_folder_and_size_based_framing(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", quiet=True)
    assert model.config.hidden_size == 64
    assert default_framing(str(tiny_model_dir), model) == "cloze"  # < 1B parameters


def test_gguf_path(tmp_path):
    with pytest.raises(UqloraError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    path = resolve_model(str(resolve_model("smollm2-135m").gguf_file))
    assert path.gguf_file is not None


def test_folder_without_config(tmp_path):
    with pytest.raises(UqloraError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    """A hub id goes to from_pretrained; offline, that fails with a UqloraError naming the model."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: env is too late
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").location == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(UqloraError, match="could not load model 'HuggingFaceTB/SmolLM2-135M'"):
        load_model("HuggingFaceTB/SmolLM2-135M", quiet=True)


def test_dtype_choice():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UqloraError, match="unknown --dtype"):
        pick_dtype("int3", torch.device("cpu"))


@pytest.mark.parametrize("machine, avx512_bf16, amx, device, dtype, warns", [
    ("x86_64", False, False, "cpu", torch.bfloat16, True),  # AVX2 only: bf16 emulated
    ("AMD64", False, False, "cpu", torch.bfloat16, True),  # Windows' name for it
    ("x86_64", True, False, "cpu", torch.bfloat16, False),  # AVX512-BF16
    ("x86_64", False, True, "cpu", torch.bfloat16, False),  # AMX
    ("x86_64", False, False, "cpu", torch.float32, False),
    ("x86_64", False, False, "cuda", torch.bfloat16, False),
    ("aarch64", False, False, "cpu", torch.bfloat16, False),  # the probes are x86 flags: nothing to tell there
])
def test_bf16_warning_only_where_the_cpu_lacks_bf16_units(monkeypatch, machine, avx512_bf16, amx, device, dtype,
                                                          warns):
    """The decision table of the slow-bf16 warning, and that it names the fix."""
    pretend_cpu(monkeypatch, machine, avx512_bf16, amx)
    message = cpu_bf16_warning(torch.device(device), dtype)
    assert (message is not None) == warns
    if warns:
        assert "--dtype float32" in message


def test_load_model_warns_of_emulated_bf16(monkeypatch, capsys, tiny_model_dir):
    """Loading in bf16 on a CPU without bf16 units prints one warning line to stderr, and still loads."""
    pretend_cpu(monkeypatch, "x86_64", False, False)
    model, _ = load_model(str(tiny_model_dir), dtype="bf16", device="cpu", quiet=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "bf16 matrix instructions" in warnings[0]


def test_lora_options_reach_peft(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu", quiet=True)
    lora = add_lora(model, r=4, alpha=12, dropout=0.2, target_modules=["q_proj", "k_proj", "o_proj"])
    config = lora.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.2)
    assert set(config.target_modules) == {"q_proj", "k_proj", "o_proj"}
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B × 3 modules × 2 layers


def test_gemma3_alias_ties_embeddings_and_scores():
    """Gemma-3-270m from its split GGUF packages: assembled, converted with the output embedding tied to the
    input one (the GGUF has no separate lm_head), and cloze scores equal a direct computation."""
    from uqlora.data.question import Question
    from uqlora.framing import cloze_scores

    from test_framing import direct_cloze

    model, tokenizer = load_model("gemma3-270m", quiet=True)
    assert model.config.model_type.startswith("gemma3")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    q = Question("g", "Which gas do plants take in?", ("carbon dioxide", "helium", "neon"), 0)
    with torch.no_grad():
        scores = cloze_scores(model, tokenizer, [q])
        assert scores[0].tolist() == pytest.approx(direct_cloze(model, tokenizer, q), abs=2e-4)
