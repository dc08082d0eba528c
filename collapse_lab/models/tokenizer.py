"""A byte-level BPE tokenizer trained on the world's corpus (Hugging Face `tokenizers`).

With `split_digits` the pre-tokenizer cuts every digit off on its own (a leading space
stays with the first digit): " 37" -> " 3" + "7" and " 100" -> " 1" + "0" + "0". Numbers
then span several tokens and " 3" is a token-prefix of " 37", the case the evaluator's
end-of-answer rule exists for. Saved as a `PreTrainedTokenizerFast`, so
`AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated")] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- any tokenizer
# The rest of the lab reads prompts and completions through these two functions, so that every
# stage sees the same tokens whatever the tokenizer: a BOS or not, "▁3" or "Ġ3" or " 37" as one token.


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts BEFORE a text (a BOS, or nothing); what it would put after (some
    tokenizers append EOS) is never used: a prompt must not end the text."""
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_specials) - len(plain) + 1):
        if with_specials[i:i + len(plain)] == plain:
            return list(with_specials[:i])
    return []


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as a model reads it at the start of a sequence: the tokenizer's leading
    special tokens (BOS, when it adds one), then the text, nothing after. Prompts everywhere (sampling,
    FeedME's labels, the reward model, the evaluator) go through this one function."""
    prefix = special_prefix(tokenizer)
    return [prefix + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def decode_continuations(tokenizer, prefixes: list[list[int]], continuations: list[list[int]]) -> list[str]:
    """The text each continuation adds after its prefix: decode(prefix + continuation) minus decode(prefix).

    Decoding a completion alone loses text for SentencePiece-style tokenizers (Metaspace drops the "▁"
    of the first token: [▁3, 7] alone decodes to "37", after a prompt to " 37", and the rater reads
    " {integer}"). Special tokens are skipped; no clean-up of spaces. Falls back to decoding the
    continuation alone when the joint text does not start with the prefix's.
    """
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    heads = tokenizer.batch_decode(prefixes, **kw)
    whole = tokenizer.batch_decode([list(p) + list(c) for p, c in zip(prefixes, continuations)], **kw)
    alone = tokenizer.batch_decode(continuations, **kw)
    return [w[len(h):] if w.startswith(h) else a for h, w, a in zip(heads, whole, alone)]


def answer_token_ids(tokenizer, answers: list[str], prompt: Optional[str] = None) -> list[tuple[int, ...]]:
    """Canonical tokens of each answer; ValueError if one is empty or two coincide (they'd count twice).

    Each answer encoded on its own; with `prompt`, the tokens it gets AFTER the prompt when that differs:
    tokens(prompt + a) minus tokens(prompt), where the joint encoding starts with the prompt's. Tokenizers
    that prepend "▁" to every encode call (SentencePiece "legacy" Llama/Mistral ones) spell " 37" alone
    as "▁" "▁3" "7", and after a prompt as "▁3" "7": the text the model reads is the in-context one."""
    seqs = [tuple(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    if prompt is not None:
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        joint = tokenizer([prompt + a for a in answers], add_special_tokens=False)["input_ids"]
        seqs = [tuple(j[len(head):]) if j[:len(head)] == head else s for s, j in zip(seqs, joint)]
    seen: dict[tuple[int, ...], str] = {}
    for a, s in zip(answers, seqs):
        if not s:
            raise ValueError(f"answer {a!r} encodes to no tokens")
        if s in seen:
            raise ValueError(f"answers {seen[s]!r} and {a!r} encode to the same tokens {list(s)}")
        seen[s] = a
    return seqs
