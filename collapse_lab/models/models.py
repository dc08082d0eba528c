"""Model construction: the lab's from-scratch base (any transformers architecture by name)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from collapse_lab.core.config import ConfigError
from collapse_lab.core.distributed import process_state
from collapse_lab.models.real_models import resolve as resolve_real
from collapse_lab.core.suites import load_suite
from collapse_lab.models.tokenizer import answer_token_ids, decode_continuations, encode_texts

# transformers deprecates the `is_gradient_checkpointing` property that TRL's trainers still read on every LoRA
# model: a warning about the libraries' versions, with nothing in it for the user to do.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(cfg) -> str:
    """"no" | "bf16" | "fp16": the config's `precision`, or with `auto` the launcher's (accelerate sets
    ACCELERATE_MIXED_PRECISION from its config file or --mixed_precision), else "no"."""
    p = cfg.precision
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no") if p == "auto" else p


def trainer_precision(cfg) -> dict:
    """TrainingArguments' bf16/fp16 for the config's mixed precision (`auto`: the launcher's, else none).
    Always set, never left to the library: TRL's SFTConfig and RewardConfig default to bf16 autocast even
    on CPUs, which would make FeedME and the reward model run at another precision than PPO and the base
    (and leave bf16 in accelerate's process-wide state for the next stage of an ablation)."""
    p = mixed_precision(cfg)
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def default_device() -> torch.device:
    """This process's device: its GPU under `accelerate launch` (cuda:<local rank>), the GPU or Apple MPS
    of a plain run, else the CPU; never hard-coded."""
    return process_state().device


def autocast(cfg, device):
    """torch.autocast for inference stages (sampling) at the config's mixed precision; a no-op for "no"."""
    p = mixed_precision(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


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
        num_key_value_heads=mcfg.num_heads,  # full multi-head attention (Qwen2/Mistral would default to 32/8 kv heads)
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

    path = resolve_real(path)  # real:<name> / a .gguf file: its dequantised directory (collapse_lab/models/real_models.py)
    check_path(path)
    check_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt file
        raise ConfigError(f"cannot load model '{path}' ({_where(path)}): {' '.join(str(e).split())[:300]}") from None
    check_tokenizer(tokenizer, path)
    ensure_eos(tokenizer, model.config, path)
    if tokenizer.pad_token is None:  # GPT-2/Pythia/Llama ship without one; batching needs it (masks say what is real)
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


def ensure_eos(tokenizer, config, path: str) -> None:
    """The lab needs an end-of-text token (a document's end, the rater's "ends cleanly"): the tokenizer's,
    else the model config's `eos_token_id`; neither is a one-line ConfigError."""
    if tokenizer.eos_token_id is not None:
        return
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if eos is None or not 0 <= eos < len(tokenizer):
        raise ConfigError(f"the tokenizer of '{path}' has no EOS token, nor does its model config (eos_token_id): "
                          "the lab needs one to end a completion")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


RM_PAD = "<|pad|>"


def distinct_pad(tokenizer, model=None) -> None:
    """Give a reward model's tokenizer a pad token that is NOT EOS (and the model the row and config for it).

    transformers' sequence-classification heads read the score at the last token whose id is not
    `config.pad_token_id`; with pad = EOS (GPT-2, Pythia, Qwen, Llama checkpoints here) the EOS that marks
    an ended completion would be skipped, and an ended answer would score exactly as the same text cut off.
    A fresh pad id makes every consumer (TRL's collator, the head's pooling) right without changing their
    code; its embedding row is never read by a real position (right padding, causal attention), so its
    initial value does not matter. The POLICY keeps its tokenizer: a new row in its output layer would take
    probability mass and change the distributions the evaluator measures.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": RM_PAD})
    tokenizer.padding_side = "right"
    if model is not None:
        if model.get_input_embeddings().num_embeddings <= tokenizer.pad_token_id:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------- what the lab assumes of a model
# Checked before any work (every stage's resolve_base, the ablation's plan): one line, exit 2, nothing written.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _where(path: str) -> str:
    return "a local directory" if Path(path).exists() else "not a local directory, nor loadable from the hub"


def check_path(path: str) -> None:
    """ConfigError unless `path` is a directory with a config.json, or looks like a hub name."""

    hub_like = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith(".")
    if not Path(path).exists() and not hub_like:
        raise ConfigError(f"model path '{path}' does not exist (a local directory or a Hugging Face hub name)")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"'{path}' holds no model (no config.json): not a finished run or a saved model directory")
    if Path(path).is_dir() and not any(any(Path(path).glob(w)) for w in WEIGHT_FILES):
        raise ConfigError(f"'{path}' holds no weights (none of {', '.join(WEIGHT_FILES)}): not a finished run or a "
                          "saved model directory")


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.gguf", "*.pt")


def check_causal_lm(path: str) -> None:
    """ConfigError unless `path`'s config is one AutoModelForCausalLM builds, and its checkpoint (the
    config's `architectures`, when it says) is that causal LM, not an encoder or a classifier."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load model '{path}' ({_where(path)}): {' '.join(str(e).split())[:300]}") from None
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    names = set(names) if isinstance(names, (list, tuple)) else {names}
    archs = set(getattr(config, "architectures", None) or [])
    if None in names or getattr(config, "is_encoder_decoder", False) or (archs and not archs & names):
        what = f"model_type '{config.model_type}'" + (f", architectures {sorted(archs)}" if archs else "")
        raise ConfigError(f"'{path}' is not a causal LM ({what}); the lab needs a model that "
                          "AutoModelForCausalLM loads (GPT-2, GPT-NeoX/Pythia, Llama, Qwen2, ...)")


def check_tokenizer(tokenizer, path: str) -> None:
    """ConfigError if `path` holds no tokenizer (transformers then builds an EMPTY one from the config alone)."""

    local = Path(path).is_dir()
    if (local and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES)) or not tokenizer.get_vocab() \
            or tokenizer.vocab_size == 0:
        raise ConfigError(f"'{path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                          f"tokenizer there (tokenizer.save_pretrained('{path}'))")


def context_length(config):
    """The model's longest sequence in tokens (None: no limit it states)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


_CHECKED: dict = {}


def check_base(path: str, world, new_tokens: int) -> None:
    """Before any work on base `path` (a user's model): a causal LM with a tokenizer (and an EOS), that
    can spell every answer the world and its suites score, and whose context holds the world's longest
    prompt plus `new_tokens`. Each failure is ONE ConfigError line naming the model and the fix.

    Spelling: each answer (" 0" .. " 100", the arithmetic sums) encodes without the unknown token and
    decodes back to itself after a prompt; each prompt encodes without the unknown token."""
    path = resolve_real(path)
    key = (path, getattr(world.cfg, "name", None), new_tokens)
    if key in _CHECKED:
        return
    check_path(path)
    check_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load the tokenizer of '{path}': {' '.join(str(e).split())[:300]}") from None
    check_tokenizer(tokenizer, path)
    config = AutoConfig.from_pretrained(path)
    ensure_eos(tokenizer, config, path)
    suites = [load_suite(s) for s in ("seed", "arithmetic", "stories")]
    world_prompts = set(world.by_text) if hasattr(world, "by_text") else {world.the_prompt.text}  # world=bandit
    prompts = sorted(world_prompts | {p.text for s in suites for p in s.prompts})
    answers = sorted({a for s in suites for p in s.prompts for a in (p.answers or [])})
    unk = tokenizer.unk_token_id
    prompt_ids = encode_texts(tokenizer, prompts)
    context = suites[0].prompts[0].text  # the answers as the evaluator reads them: after a seed prompt
    try:
        answer_ids = [list(ids) for ids in answer_token_ids(tokenizer, answers, context)]
    except ValueError as e:  # an answer of no tokens, or two answers of the same tokens
        raise ConfigError(f"the tokenizer of '{path}' cannot spell the answers: {e}") from None
    decoded = decode_continuations(tokenizer, encode_texts(tokenizer, [context]) * len(answers), answer_ids)
    for a, ids, back in zip(answers, answer_ids, decoded):
        if not ids or (unk is not None and unk in ids) or back != a:
            raise ConfigError(f"the tokenizer of '{path}' cannot spell the answer {a!r} (it reads back as {back!r}, "
                              f"tokens {tokenizer.convert_ids_to_tokens(ids)}); the evaluator and the rater need "
                              "every answer spelled exactly")
    for text, ids in zip(prompts, prompt_ids):
        if unk is not None and unk in ids:
            raise ConfigError(f"the tokenizer of '{path}' cannot spell the prompt {text[:40]!r}... "
                              f"(it becomes {tokenizer.unk_token!r}); the lab's world needs every prompt spelled")
    limit = context_length(config)
    longest = max(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    if limit is not None and len(prompt_ids[longest]) + new_tokens > limit:
        raise ConfigError(f"the context of '{path}' ({limit} tokens) is shorter than the world's longest prompt "
                          f"({len(prompt_ids[longest])} tokens) + {new_tokens} new tokens; use a model with a longer "
                          "context or fewer *.max_new_tokens")
    _CHECKED[key] = True
