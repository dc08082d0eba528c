"""Model presets: real models load by path (here: tiny ones saved from configs), with LoRA."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from collapse_lab.core.config import ConfigError, compose
from collapse_lab.models.models import build_base_model, load_pretrained
from collapse_lab.models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"Q: pick a number.\nA: {n}" for n in range(200)], vocab_size=300)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "mistral", "gemma3_text"])
def test_build_every_arch(tokenizer, arch):
    cfg = compose("lab", [f"model.arch={arch}", "model.hidden_size=32", "model.num_heads=2", "model.num_layers=1"])
    model = build_base_model(cfg.model, tokenizer)
    assert model.config.model_type == arch and model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m"])
def test_preset_loads_from_a_local_directory_with_lora(tmp_path, tokenizer, preset):
    cfg = compose("lab", [f"model={preset}", f"model.path={tmp_path}", "peft.enabled=true", "peft.r=4"])
    config = AutoConfig.for_model(cfg.model.arch, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, n_inner=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_pretrained(cfg.model.path, cfg.model.dtype, cfg.peft)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert tok.pad_token is not None


def test_missing_model_path_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_pretrained(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
