"""Sampling completions and scoring their tokens: what every regime shares.

`generate` samples from the model's FULL next-token distribution at a temperature (no
top-k / top-p: the regimes' closed forms are over the whole vocabulary), and `token_logprobs`
recomputes the log-probabilities of the sampled tokens under the same temperature, so the
loss uses exactly the distribution that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    logprobs: torch.Tensor | None = None  # (B, Tr) log π_T(token_t | s_t) of the sampling distribution, nats
    entropy: torch.Tensor | None = None  # (B, Tr) H(π_T(·|s_t)) over the full vocabulary, nats
    hidden: torch.Tensor | None = None  # (B, Tr, H) last hidden state where token t was predicted

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
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             hidden: bool = False) -> Rollout:
    """Sample one completion per prompt (torch's global RNG: seed it for reproducibility).

    The responses are as wide as the longest one (generation stops when all have ended). The
    sampled tokens' log-probabilities come from the generation's own logits (divided by the
    temperature, as the sampler did): no second forward pass of the policy is needed. With
    `hidden`, the last hidden state at each sampling position comes too (a value head's input).
    """
    batch = encode_prompts(tokenizer, prompts, model.device)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                              max_new_tokens=max_new_tokens, min_new_tokens=1, output_logits=True,
                              output_hidden_states=hidden, return_dict_in_generate=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    gen = model.generate(**batch, generation_config=config)
    q = batch["input_ids"].shape[1]
    response = gen.sequences[:, q:]
    logits = torch.stack(gen.logits, 1).float() / temperature  # (B, Tr, V) raw logits / T
    logprobs = token_logprobs(logits, response)
    entropy = entropy_from_logits(logits)
    del logits
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
        logprobs=logprobs * response_mask,
        entropy=entropy * response_mask,
        hidden=torch.stack([h[-1][:, -1] for h in gen.hidden_states], 1) if hidden else None,
    )


def generate_by_length(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                       hidden: bool = False, chunk: int = 8) -> Rollout:
    """`generate` over chunks of `chunk` prompts of similar length, merged back in the prompts' order.

    Every row pays prefill for the batch's longest prompt (left padding): on the numbers world
    (prompts of 9..83 tokens, mean 28) a batch of 32 spends ~3x the prefill it needs; chunks of 8
    in length order halve generation's time (benchmarks/bench_ppo.py --profile).
    """
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    parts = [generate(model, tokenizer, [prompts[i] for i in order[k:k + chunk]], max_new_tokens, temperature, hidden)
             for k in range(0, len(order), chunk)]
    return take(concat(parts, tokenizer.pad_token_id), torch.tensor(order).argsort())


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts stacked row-wise: prompts left-padded to the longest, responses right-padded to the widest."""
    q, w = max(r.query_len for r in parts), max(width(r) for r in parts)

    def pad(x, left, right, value=0):  # along the token axis (dim 1) of (B, T) or (B, T, H)
        return F.pad(x, (left, right) if x.dim() == 2 else (0, 0, left, right), value=value)

    def stack(r):
        dq, dw = q - r.query_len, w - width(r)
        return dict(
            input_ids=torch.cat([pad(r.input_ids[:, :r.query_len], dq, 0, pad_id), pad(r.responses, 0, dw, pad_id)], 1),
            attention_mask=torch.cat([pad(r.attention_mask[:, :r.query_len], dq, 0),
                                      pad(r.attention_mask[:, r.query_len:], 0, dw)], 1),
            response_mask=pad(r.response_mask, 0, dw), ended=r.ended, logprobs=pad(r.logprobs, 0, dw),
            entropy=pad(r.entropy, 0, dw), hidden=None if r.hidden is None else pad(r.hidden, 0, dw))

    rows = [stack(r) for r in parts]
    cat = {k: None if rows[0][k] is None else torch.cat([x[k] for x in rows]) for k in rows[0]}
    return Rollout(**cat, texts=[t for r in parts for t in r.texts], query_len=q)


def take(r: Rollout, idx: torch.Tensor) -> Rollout:
    """The rows `idx` of a rollout, as they are."""
    pick = lambda x: None if x is None else x[idx]  # noqa: E731
    return Rollout(r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx], r.ended[idx],
                   [r.texts[i] for i in idx.tolist()], r.query_len, pick(r.logprobs), pick(r.entropy), pick(r.hidden))


def trim_left_padding(r: Rollout) -> Rollout:
    """Drop prompt columns that are padding in every row (a batch of short prompts need not
    carry the width of the longest prompt of the rollout)."""
    real = r.attention_mask[:, :r.query_len].any(0).nonzero()
    first = int(real[0]) if len(real) else 0
    if first == 0:
        return r
    return replace(r, input_ids=r.input_ids[:, first:], attention_mask=r.attention_mask[:, first:],
                   query_len=r.query_len - first)


def trim_right_padding(r: Rollout) -> Rollout:
    """Drop response columns past every row's EOS (responses are as wide as the rollout's longest;
    a batch of short ones need not carry that width). Per-token outputs are then `width(r)` wide."""
    w = max(int(r.response_mask.sum(1).max()), 1)
    if w == r.response_mask.shape[1]:
        return r
    cut = lambda x: None if x is None else x[:, :w]  # noqa: E731
    return replace(r, input_ids=r.input_ids[:, :r.query_len + w], attention_mask=r.attention_mask[:, :r.query_len + w],
                   response_mask=r.response_mask[:, :w], logprobs=cut(r.logprobs), entropy=cut(r.entropy),
                   hidden=cut(r.hidden))


def width(r: Rollout) -> int:
    """Tr: response columns."""
    return r.response_mask.shape[1]


def select(r: Rollout, idx: torch.Tensor) -> Rollout:
    """The rows `idx` of a rollout, left and right padding trimmed."""
    return trim_right_padding(trim_left_padding(take(r, idx)))


def length_chunks(r: Rollout, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The rows `idx` sorted by prompt length, in chunks of `size`: each chunk then pads only to
    its own longest prompt (micro-batches of a minibatch, and the no-gradient forwards)."""
    idx = idx[r.attention_mask[idx, :r.query_len].sum(1).argsort()]
    return list(idx.split(size))


def by_prompt_length(r: Rollout, fn, chunk: int) -> torch.Tensor:
    """fn(sub-rollout) -> (b, w) over length-sorted chunks (each trimmed to its own width w),
    zero-padded back to (B, Tr) and reassembled in the rollout's order."""
    chunks = length_chunks(r, torch.arange(len(r.texts)), chunk)
    out = torch.cat([F.pad(y, (0, width(r) - y.shape[1])) for y in (fn(select(r, c)) for c in chunks)])
    return out[torch.cat(chunks).argsort()]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding must not shift them)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def response_logits(model, rollout: Rollout, temperature: float = 1.0, hidden: bool = False):
    """(B, Tr, V) next-token logits / temperature at each response position; with `hidden`,
    also the (B, Tr, H) last hidden states there (the LM head's input: a value head's too)."""
    tr = width(rollout)
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids(rollout.attention_mask), use_cache=False,
                logits_to_keep=tr + 1, output_hidden_states=hidden)  # LM head only where responses are predicted
    logits = out.logits[:, :-1].float() / temperature
    return (logits, out.hidden_states[-1][:, -tr - 1:-1]) if hidden else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) log pi(token_t | s_t), nats, from (B, T, V) logits."""
    return torch.gather(F.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) H(pi(.|s_t)) = -sum_v softmax(z)_v log_softmax(z)_v over the FULL vocabulary, nats.
    Differentiable: the entropy bonus of `ent<alpha>` recipes back-propagates through it."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)
