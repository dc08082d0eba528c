"""Model construction: the lab's from-scratch base (any transformers architecture by name)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from collapse_lab.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_base_model(mcfg, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised causal LM of type `mcfg.arch` sized by the model preset.

    Standard transformers names (hidden_size, num_hidden_layers, ...) map onto every
    architecture's own (GPT-2's n_embd, ...) through the configs' attribute maps.
    """
    config = AutoConfig.for_model(
        mcfg.arch,
        vocab_size=len(tokenizer),
        hidden_size=mcfg.hidden_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        intermediate_size=mcfg.intermediate_size,
        n_inner=mcfg.intermediate_size,  # GPT-2's name for the MLP width
        max_position_embeddings=mcfg.max_seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, dtype=DTYPES[mcfg.dtype])


def load_pretrained(path: str, dtype: str = "float32", peft=None):
    """(model, tokenizer) from a local directory or a hub name, optionally LoRA-wrapped (peft).

    A path that is neither a directory nor loadable from the hub (offline, typo) is a
    one-line ConfigError naming it.
    """
    from safetensors import SafetensorError

    hub_like = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith(".")
    if not Path(path).exists() and not hub_like:
        raise ConfigError(f"model path '{path}' does not exist (a local directory or a Hugging Face hub name)")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"'{path}' holds no model (no config.json): not a finished run or a saved model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt file
        where = "a local directory" if Path(path).exists() else "not a local directory, nor loadable from the hub"
        raise ConfigError(f"cannot load model '{path}' ({where}): {' '.join(str(e).split())[:300]}") from None
    if tokenizer.pad_token is None:  # GPT-2/Pythia ship without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    if peft is not None and peft.enabled:
        model = add_lora(model, peft)
    return model, tokenizer


def add_lora(model, peft, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA adapter (`peft` section of the config); only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    heads = ["score", "classifier"] if task_type != "CAUSAL_LM" else None  # trained in full (modules_to_save)
    return get_peft_model(model, LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                                            target_modules=peft.target_modules, task_type=task_type,
                                            exclude_modules=heads))
