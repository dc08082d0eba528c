"""Sampling completions and scoring their tokens: what every regime shares.

`generate` samples from the model's FULL next-token distribution at a temperature (no
top-k / top-p: the regimes' closed forms are over the whole vocabulary), and `token_logprobs`
recomputes the log-probabilities of the sampled tokens under the same temperature, so the
loss uses exactly the distribution that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, Tq + Tr) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, Tq + Tr) 1 on real prompt tokens and on the response up to EOS
    response_mask: torch.Tensor  # (B, Tr) 1 on generated tokens up to and including EOS
    ended: torch.Tensor  # (B,) bool: the completion stopped with EOS (not cut at max_new_tokens)
    texts: list[str]  # completions decoded, EOS and padding removed
    query_len: int  # Tq

    @property
    def responses(self) -> torch.Tensor:  # (B, Tr)
        return self.input_ids[:, self.query_len:]


def encode_prompts(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (generation appends on the right)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0) -> Rollout:
    """Sample one completion per prompt (torch's global RNG: seed it for reproducibility)."""
    batch = encode_prompts(tokenizer, prompts, model.device)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                              max_new_tokens=max_new_tokens, min_new_tokens=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = model.generate(**batch, generation_config=config)
    q = batch["input_ids"].shape[1]
    response = out[:, q:]
    if response.shape[1] < max_new_tokens:  # every sequence ended early: pad to a fixed width
        response = F.pad(response, (0, max_new_tokens - response.shape[1]), value=tokenizer.pad_token_id)
    is_eos = response == tokenizer.eos_token_id
    # 1 up to and including the first EOS; generate pads after it (pad may equal EOS)
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    ended = is_eos.any(1)
    texts = tokenizer.batch_decode(response.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([batch["input_ids"], response], 1),
        attention_mask=torch.cat([batch["attention_mask"], response_mask], 1),
        response_mask=response_mask,
        ended=ended,
        texts=texts,
        query_len=q,
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding must not shift them)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def response_logits(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(B, Tr, V) next-token logits / temperature at each response position."""
    tr = rollout.input_ids.shape[1] - rollout.query_len
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids(rollout.attention_mask), use_cache=False,
                logits_to_keep=tr + 1)  # the LM head only where response tokens are predicted
    return out.logits[:, :-1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) log pi(token_t | s_t), nats, from (B, T, V) logits."""
    return torch.gather(F.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) H(pi(.|s_t)) = -sum_v softmax(z)_v log_softmax(z)_v over the FULL vocabulary, nats.
    Differentiable: the entropy bonus of `ent<alpha>` recipes back-propagates through it."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)
