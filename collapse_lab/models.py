"""Model construction: the lab's from-scratch base (any transformers architecture by name)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

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
