"""A byte-level BPE tokenizer trained on the world's corpus (Hugging Face `tokenizers`).

With `split_digits` the pre-tokenizer cuts every digit off on its own (a leading space
stays with the first digit): " 37" -> " 3" + "7" and " 100" -> " 1" + "0" + "0". Numbers
then span several tokens and " 3" is a token-prefix of " 37", the case the evaluator's
end-of-answer rule exists for. Saved as a `PreTrainedTokenizerFast`, so
`AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

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
