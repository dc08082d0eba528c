"""Tiny tokenizers and random models built from configs, for offline tests.

Both tokenizers split " 37" into a " 3" token and a "7" token, so the answer " 3" is a
token-prefix of " 37" (the case the evaluator's end mass exists for):
- `byte_level_tokenizer`: GPT-2 style byte-level BPE ("Ġ3", "7"), no BOS.
- `metaspace_tokenizer`: SentencePiece/Llama style ("▁3", "7"), BOS "<s>" prepended; decode(["▁3"])
  alone is "3", so the evaluator must not take a token's text from decoding it alone.
Models have large initial weights so that next-token distributions are far from flat.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

DIGITS = "0123456789"
# characters of the test prompts (and the seed suite's), kept small so that digit tokens
# (the ones that continue a number) hold a real share of the probability mass
CHARS = sorted(set(string.ascii_letters + DIGITS + " \n:?!.,'\"()$->[]_=") )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    byte = pre_tokenizers.ByteLevel.alphabet()
    to_bytes = {c: pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(c)[0][0] for c in CHARS}
    alphabet = sorted({to_bytes[c] for c in CHARS} & set(byte))
    merges = [("Ġ", d) for d in DIGITS] + [("Ġ4", "2")]  # " 42" is one token, " 4" another
    vocab = {t: i for i, t in enumerate(alphabet + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    chars = [c for c in CHARS if c != " "]
    merges = [("▁", d) for d in DIGITS]
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "▁"] + chars + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(tokenizer, vocab_size: int = 128, seed: int = 0, init: float = 0.5):
    """vocab_size > len(tokenizer): a padded output layer, as real checkpoints often have."""
    import torch

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=init, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gpt2(tokenizer, vocab_size: int = 128, seed: int = 0, init: float = 0.5, n_positions: int = 512):
    import torch

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions,
                     initializer_range=init)
    return AutoModelForCausalLM.from_config(cfg).eval()


def pairs():
    """(name, model, tokenizer) for both architectures, each with its own tokenizer style."""
    bl, ms = byte_level_tokenizer(), metaspace_tokenizer()
    return [("gpt2-bytelevel", tiny_gpt2(bl), bl), ("llama-metaspace", tiny_llama(ms), ms)]


def number_heavy(model, tokenizer, penalty: float = 4.0):
    """Give the output layer a bias of −penalty on every token without a digit (EOS excepted), so digit
    tokens, and hence answers and the choice "continue the number or end it", carry most of the mass."""
    import torch

    head = model.get_output_embeddings()
    V, H = head.weight.shape
    biased = torch.nn.Linear(H, V, bias=True)
    text = [tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else "" for i in range(V)]
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.tensor([0.0 if any(map(str.isdigit, t)) else -penalty for t in text]))
        biased.bias[tokenizer.eos_token_id] = 0.0
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(biased)
    return model


# ------------------------------------------------------------------ foreign families (issue 16)
# Three small causal LMs of other families, each with a tokenizer trained by `tokenizers` on the embedded
# world's corpus (nothing downloaded), saved like a checkpoint a user would point `model.path=` at. Like
# the real ones, none sets a pad token (the lab then pads with EOS).

WORLD_DOCS = 1500  # corpus documents the tokenizers are trained on (seconds)


def _world_texts() -> list[str]:
    from collapse_lab.core.config import compose
    from collapse_lab.core.suites import load_suite
    from collapse_lab.world.world import World

    world = World(compose("lab", []).world)
    suites = [p.text for s in ("seed", "arithmetic", "stories") for p in load_suite(s).prompts]
    return world.corpus(WORLD_DOCS, seed=12345) + suites + list(world.by_text)


def neox_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """GPT-NeoX style: byte-level BPE WITHOUT digit splitting (numbers merge as often as they occur:
    some are one token, others " 3" + "7"), EOS = BOS = <|endoftext|>, no BOS added, no pad token."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_world_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def gpt2_numbers_tokenizer(vocab_size: int = 900) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE where every " n" (n = 0..100) is ONE token, so " 3" is not a
    token-prefix of " 37" (GPT-2's own vocabulary has " 0" .. " 100" as single tokens)."""
    from tokenizers import trainers

    numbers = [f" {n}" for n in range(101)] * 50  # frequent enough that BPE merges each into one token
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_world_texts() + numbers, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def sentencepiece_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Llama style: Metaspace ("▁" for spaces, prepended to the first word), digits split one by one
    (" 37" = "▁" + "3" + "7": every answer starts with the same "▁" token), BOS <s> added before every
    text, EOS </s>, <unk> for what it cannot spell, no pad token."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(_world_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def family_model(family: str, tokenizer, seed: int = 0, init: float = 0.2, context: int = 512):
    """A tiny random causal LM of `family` ("gpt_neox", "gpt2", "llama") for `tokenizer`; GPT-NeoX's
    embedding is padded to a multiple of 64 rows, as Pythia's is (50304 rows for 50277 tokens)."""
    import torch
    from transformers import GPTNeoXConfig

    torch.manual_seed(seed)
    V = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=-(-V // 64) * 64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=context, rotary_pct=0.25,
                            initializer_range=init, tie_word_embeddings=False, **ids)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=context, initializer_range=init, **ids)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, initializer_range=init,
                          tie_word_embeddings=False, **ids)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(cfg).eval()


FAMILIES = {"gpt_neox": neox_tokenizer, "gpt2": gpt2_numbers_tokenizer, "llama": sentencepiece_tokenizer}


def save_family(family: str, path, **kw):
    """Build `family`'s tokenizer and model and save both to `path` (a model.path= directory)."""
    tokenizer = FAMILIES[family]()
    model = family_model(family, tokenizer, **kw)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def legacy_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Like `sentencepiece_tokenizer`, but "▁" is prepended to EVERY encode call (SentencePiece's legacy
    Llama/Mistral behaviour): " 37" alone is "▁" "▁" "3" "7", after a prompt "▁" "3" "7"."""
    from tokenizers import normalizers

    tok = sentencepiece_tokenizer()
    inner = tok.backend_tokenizer
    inner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # Llama-2's
    inner.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", behavior="merged_with_next"),
                                                   pre_tokenizers.Digits(individual_digits=True)])
    inner.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
