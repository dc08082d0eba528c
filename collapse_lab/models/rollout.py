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

from collapse_lab.models.tokenizer import decode_continuations, encode_texts


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
    """Left-padded prompt batch (generation appends on the right); each prompt as `encode_texts` gives
    it (the tokenizer's BOS when it adds one, never a trailing EOS)."""
    ids = encode_texts(tokenizer, prompts)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)  # (B, Tq)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
             hidden: bool = False, packed: bool | None = None) -> Rollout:
    """Sample one completion per prompt (torch's global RNG: seed it for reproducibility).

    Ancestral sampling from softmax(z/T) over the FULL vocabulary (no top-k / top-p), written out
    rather than through `model.generate`, so that each DISTINCT prompt is run once (`PackedDecoder`
    where `packed`, by default on the model types `packs` allows while the packed sequence stays within
    PACKED_MAX_TOKENS, else `CacheDecoder`: the same tokens from the same seed) and the log-probabilities
    and entropies of the sampling distribution are read off the very logits that sampled. EOS may come
    first (an empty completion): masking it there (min_new_tokens) would sample from another
    distribution than the one these log-probs, the KL and the update see. The responses are as wide
    as the longest one (sampling stops when all have ended). With `hidden`, the last hidden state at
    each sampling position comes too (a value head's input).
    """
    batch = encode_prompts(tokenizer, prompts, model.device)
    ids, prompt_mask = batch["input_ids"], batch["attention_mask"]  # (B, Tq)
    if packed is None:  # the packed sequence at its longest: each distinct prompt, then every row's tokens
        length = int(distinct_prompts(ids, prompt_mask)[1].sum())
        packed = packs(model) and length + len(prompts) * max_new_tokens <= PACKED_MAX_TOKENS
    decoder = (PackedDecoder if packed else CacheDecoder)(model, ids, prompt_mask, hidden)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    alive = torch.ones(len(prompts), dtype=torch.bool, device=ids.device)  # no EOS yet
    tokens, logprobs, entropy, states, mask = [], [], [], [], []
    for t in range(max_new_tokens):
        logp = F.log_softmax(decoder.logits.float() / temperature, -1)  # (B, V) the sampling distribution
        probs = logp.exp()
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(~alive, pad)  # (B,)
        tokens.append(token)
        mask.append(alive.long())
        states.append(decoder.h)
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        entropy.append(-(probs * logp).sum(-1))
        sampled, alive = alive, alive & (token != eos)
        if not alive.any() or t == max_new_tokens - 1:
            break
        decoder.step(token, sampled, alive)
    response, response_mask = torch.stack(tokens, 1), torch.stack(mask, 1)  # (B, Tr)
    is_eos = (response == eos) & response_mask.bool()
    body = (response_mask.bool() & ~is_eos).tolist()  # the completion's text tokens: no EOS, no padding
    texts = decode_continuations(tokenizer, [row[m.bool()].tolist() for row, m in zip(ids, prompt_mask)],
                                 [[t for t, keep in zip(row, k) if keep] for row, k in zip(response.tolist(), body)])
    return Rollout(
        input_ids=torch.cat([ids, response], 1),
        attention_mask=torch.cat([prompt_mask, response_mask], 1),
        response_mask=response_mask,
        ended=is_eos.any(1),
        texts=texts,
        query_len=ids.shape[1],
        logprobs=torch.stack(logprobs, 1) * response_mask,
        entropy=torch.stack(entropy, 1) * response_mask,
        hidden=torch.stack(states, 1) if hidden else None,
    )


def distinct_prompts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, inverse): the distinct rows of a (B, Tq) left-padded prompt batch and its mask, and each
    row's index among them (every forward runs each distinct prompt once)."""
    unique, inverse = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    return unique[:, :ids.shape[1]], unique[:, ids.shape[1]:], inverse


def shared_prefix_cache(model, ids: torch.Tensor, mask: torch.Tensor, hidden: bool = False):
    """One forward pass over each DISTINCT prompt row of (B, Tq) left-padded `ids`, its KV cache then
    indexed back to all B rows: rollouts repeat prompts (a few seed prompts, k samples per prompt),
    and a row's keys and values depend on its own prompt alone. Indexing is differentiable, so the
    update's gradient flows into the shared prompt computation exactly as through B separate ones.
    Returns (the output at the last prompt position, indexed to B rows, with the last layer's hidden
    states only; the cache)."""
    u_ids, u_mask, inverse = distinct_prompts(ids, mask)
    out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids(u_mask), use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden)
    cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
    cache.batch_select_indices(inverse)
    out.logits = out.logits[inverse]
    if hidden:  # callers read the last layer (the LM head's input) only
        out.hidden_states = (out.hidden_states[-1][inverse],)
    return out, cache


class CacheDecoder:
    """`generate`'s forwards on any causal LM: each row decodes on its own copy of its prompt's KV cache
    (`shared_prefix_cache`). `logits` (B, V) and `h` (B, H) are each row's next-token logits and last
    hidden state; `step` feeds every row its sampled token (padding once it has ended)."""

    def __init__(self, model, ids: torch.Tensor, prompt_mask: torch.Tensor, hidden: bool):
        out, self.cache = shared_prefix_cache(model, ids, prompt_mask, hidden)
        self.model, self.hidden = model, hidden
        self.attention, self.position = prompt_mask, prompt_mask.sum(1, keepdim=True)  # (B, T), (B, 1) next
        self.logits, self.h = out.logits[:, -1], out.hidden_states[-1][:, -1] if hidden else None

    def step(self, token: torch.Tensor, sampled: torch.Tensor, alive: torch.Tensor) -> None:
        self.attention = torch.cat([self.attention, sampled.long()[:, None]], 1)
        out = self.model(input_ids=token[:, None], attention_mask=self.attention, position_ids=self.position,
                         cache=self.cache, use_cache=True, output_hidden_states=self.hidden)
        self.logits, self.h = out.logits[:, -1], out.hidden_states[-1][:, -1] if self.hidden else None
        self.position = self.position + 1


class PackedDecoder:
    """`generate`'s forwards on the model types `packs` allows: ONE sequence for the batch, each distinct
    prompt once, then at each step the sampled tokens of the rows still going, appended under a mask by
    which a row's token sees its own prompt and its own earlier tokens only (`packed_response_logits`,
    incrementally). No per-row copy of a prompt's keys and values, and rows that have ended cost nothing.
    The same interface, logits and hidden states as `CacheDecoder` (an ended row keeps its last ones)."""

    def __init__(self, model, ids: torch.Tensor, prompt_mask: torch.Tensor, hidden: bool):
        u_ids, u_mask, self.group = distinct_prompts(ids, prompt_mask)
        u_mask, dev = u_mask.bool(), ids.device
        n_prompt = u_mask.sum(1)  # (G,)
        # each key of the sequence: its prompt, and the row it was sampled for (-1: a prompt's token)
        self.key_group = torch.arange(len(u_ids), device=dev)[:, None].expand_as(u_ids)[u_mask]
        self.key_row = torch.full_like(self.key_group, -1)
        visible = torch.ones(len(self.key_group), len(self.key_group), dtype=torch.bool, device=dev).tril() & (
            self.key_group[:, None] == self.key_group[None, :])
        last = n_prompt.cumsum(0) - 1  # each prompt's last token: predicts its rows' first response token
        self.model, self.hidden = model, hidden
        out = model(input_ids=u_ids[u_mask][None], attention_mask=attention_mask_4d(model, visible),
                    position_ids=position_ids(u_mask.long())[u_mask][None], use_cache=True, logits_to_keep=last,
                    output_hidden_states=hidden)
        self.cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
        self.logits = out.logits[0, self.group]
        self.h = out.hidden_states[-1][0, last][self.group] if hidden else None
        self.position = n_prompt[self.group]  # (B,) each row's next position

    def step(self, token: torch.Tensor, sampled: torch.Tensor, alive: torch.Tensor) -> None:
        live = alive.nonzero().squeeze(1)  # the rows whose next token is still to come
        self.key_group = torch.cat([self.key_group, self.group[live]])
        self.key_row = torch.cat([self.key_row, live])
        visible = (self.key_row[None, :] == live[:, None]) | (
            (self.key_row[None, :] == -1) & (self.key_group[None, :] == self.group[live][:, None]))  # (b, L)
        out = self.model(input_ids=token[live][None], attention_mask=attention_mask_4d(self.model, visible),
                         position_ids=self.position[live][None], cache=self.cache, use_cache=True,
                         output_hidden_states=self.hidden)
        self.logits = self.logits.index_copy(0, live, out.logits[0])
        if self.hidden:
            self.h = self.h.index_copy(0, live, out.hidden_states[-1][0])
        self.position = self.position + 1


def generate_by_length(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                       hidden: bool = False, chunk: int = 8, packed: bool | None = None) -> Rollout:
    """`generate` over chunks of `chunk` prompts of similar length, merged back in the prompts' order.

    On the cache path every row pays prefill for its chunk's longest prompt (left padding), so chunks
    in length order save prefill; the packed path pays no padding, and a chunk bounds its memory only.
    """
    lengths = list(map(len, encode_texts(tokenizer, prompts)))
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    parts = [generate(model, tokenizer, [prompts[i] for i in order[k:k + chunk]], max_new_tokens, temperature, hidden,
                      packed)
             for k in range(0, len(order), chunk)]
    merged = concat(parts, tokenizer.pad_token_id)
    return take(merged, torch.tensor(order, device=merged.input_ids.device).argsort())


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


def distinct_rows(r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): a row of each distinct (prompt, response) sequence of `r` (padding included), and
    each row's index among them (r's rows = take(r, first)'s rows [inverse]).

    A collapsing policy repeats its answers (a rollout over a few seed prompts holds each sequence many
    times), and equal sequences have equal logits, values and gradients: a forward over `take(r, first)`,
    indexed by `inverse`, equals the forward over every row (used by the no-gradient forwards: docs/ppo.md, PPO
    speed)."""
    inverse = torch.unique(torch.cat([r.input_ids, r.attention_mask], 1), dim=0, return_inverse=True)[1]
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1,), len(rows), device=rows.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def length_chunks(r: Rollout, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The rows `idx` sorted by prompt length, in chunks of `size`: each chunk then pads only to
    its own longest prompt (micro-batches of a minibatch, and the no-gradient forwards)."""
    idx = idx.to(r.attention_mask.device)
    idx = idx[r.attention_mask[idx, :r.query_len].sum(1).argsort(stable=True)]  # a prompt's rows stay together
    return list(idx.split(size))


def by_prompt_length(r: Rollout, fn, chunk: int) -> torch.Tensor:
    """fn(sub-rollout) -> (b, w, ...) over the rollout's DISTINCT sequences (`distinct_rows`) in
    length-sorted chunks of `chunk` (each trimmed to its own width w), zero-padded back to (B, Tr, ...)
    and indexed back to the rollout's rows in its order (the no-gradient forwards: reference, π_old)."""
    first, inverse = distinct_rows(r)
    once = take(r, first)
    chunks = length_chunks(once, torch.arange(len(first)), chunk)
    pad = lambda y: F.pad(y, (0, 0) * (y.dim() - 2) + (0, width(r) - y.shape[1]))
    out = torch.cat([pad(fn(select(once, c))) for c in chunks])
    return out[torch.cat(chunks).argsort()][inverse]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding must not shift them)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def response_logits(model, rollout: Rollout, temperature: float = 1.0, hidden: bool = False):
    """(B, Tr, V) next-token logits / temperature at each response position; with `hidden`,
    also the (B, Tr, H) last hidden states there (the LM head's input: a value head's too).

    Each distinct prompt is computed once (`shared_prefix_cache`), then the responses (all but
    their last token, whose next-token logits nobody needs) run on its cache."""
    q, tr = rollout.query_len, width(rollout)
    prompt_mask = rollout.attention_mask[:, :q]
    first, cache = shared_prefix_cache(model, rollout.input_ids[:, :q], prompt_mask, hidden)
    logits, states = [first.logits[:, -1:]], [first.hidden_states[-1][:, -1:]] if hidden else []
    if tr > 1:
        out = model(input_ids=rollout.responses[:, :-1], attention_mask=rollout.attention_mask[:, :q + tr - 1],
                    position_ids=prompt_mask.sum(1, keepdim=True) + torch.arange(tr - 1, device=prompt_mask.device),
                    cache=cache, use_cache=True, output_hidden_states=hidden)
        logits.append(out.logits)
        if hidden:
            states.append(out.hidden_states[-1])
    logits = torch.cat(logits, 1).float() / temperature
    return (logits, torch.cat(states, 1)) if hidden else logits


PACKABLE = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")  # model types whose custom-4D-mask path is tested equal
# The longest packed sequence: its mask, and the attention over it (dense, masked), grow as its length squared
# where the per-row caches' grow as rows x (prompt + response); past this the per-row path is the cheaper one
PACKED_MAX_TOKENS = 4096


def packs(model) -> bool:
    """Whether the packed forwards (`packed_response_logits`, `PackedDecoder`) may stand in for the per-row
    ones (`response_logits`, `CacheDecoder`) on `model` (or its DDP wrapper): a model
    type tested to take a custom 4D mask with position ids (tests/test_ppo.py), under SDPA or eager
    attention (flash-attention kernels take no such mask)."""
    config = getattr(model, "module", model).config  # through a DDP wrapper
    return config.model_type in PACKABLE and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def attention_mask_4d(model, visible: torch.Tensor) -> torch.Tensor:
    """(1, 1, queries, keys) custom mask of one packed sequence from `visible` (True: the query may attend
    to the key): boolean for SDPA, additive (0 / the dtype's minimum) for eager attention."""
    inner = getattr(model, "module", model)  # through a DDP wrapper
    if inner.config._attn_implementation != "sdpa":
        visible = torch.zeros(visible.shape, dtype=inner.dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(inner.dtype).min)
    return visible[None, None]


def packed_response_logits(model, rollout: Rollout, temperature: float = 1.0, hidden: bool = False):
    """`response_logits` from ONE packed sequence: each distinct prompt once, each followed by its
    completions (all but their last token), under a block-causal mask by which a completion's tokens see
    their prompt and their own earlier tokens only, positions counting on from the prompt's length in
    each completion. The same logits and gradient as the per-row forward on a shared prompt cache,
    without copying the prompt's keys and values to every row (nor scattering their gradient back), and
    without padding; full-vocabulary logits only where a response token is predicted. A packed sequence
    longer than PACKED_MAX_TOKENS runs as `response_logits` instead.

    Past a row's last response token the output repeats its first position (masked by every caller)."""
    q, tr, dev = rollout.query_len, width(rollout), rollout.input_ids.device
    u_ids, u_mask, group = distinct_prompts(rollout.input_ids[:, :q], rollout.attention_mask[:, :q])
    n_groups, n_rows = len(u_ids), len(group)
    n_prompt = u_mask.sum(1)  # (G,) real prompt tokens
    w = rollout.response_mask.sum(1).long()  # (B,) response tokens, EOS included
    steps = torch.arange(tr - 1, device=dev)
    # items: the G prompts, then the B bodies (a completion but its last token), as rows of one padded matrix
    cols = max(q, tr - 1)
    pad = lambda x, left=0: F.pad(x, (left, cols - x.shape[1] - left))  # noqa: E731
    items = torch.cat([pad(u_ids, cols - q), pad(rollout.responses[:, :tr - 1])])
    valid = torch.cat([pad(u_mask, cols - q), pad((steps < (w - 1)[:, None]).long())]).bool()
    item_pos = torch.cat([pad(position_ids(u_mask), cols - q), pad(n_prompt[group][:, None] + steps)])
    item_group = torch.cat([torch.arange(n_groups, device=dev), group])
    order = (item_group * (n_rows + 1) + torch.cat([torch.zeros(n_groups, dtype=torch.long, device=dev),
                                                   torch.arange(1, n_rows + 1, device=dev)])).argsort()
    keep = valid[order]  # each prompt, then its completions' bodies
    if int(keep.sum()) > PACKED_MAX_TOKENS:
        return response_logits(model, rollout, temperature, hidden)
    ids, pos = items[order][keep], item_pos[order][keep]  # (L,)
    owner = order[:, None].expand_as(keep)[keep]  # (L,) the item each packed token belongs to
    same_prompt = (owner < n_groups)[None, :] & (item_group[owner][None, :] == item_group[owner][:, None])
    visible = torch.ones(len(ids), len(ids), dtype=torch.bool, device=dev).tril() & (
        (owner[:, None] == owner[None, :]) | same_prompt)  # (L query, L key)
    counts = keep.sum(1)
    start = torch.empty_like(counts)
    start[order] = counts.cumsum(0) - counts  # where each item begins in the packed sequence
    first = (start[:n_groups] + n_prompt - 1)[group]  # (B,) the last prompt token: predicts response token 0
    t = torch.arange(tr, device=dev)
    read = torch.where((t >= 1) & (t < w[:, None]), start[n_groups:, None] + t - 1, first[:, None])  # (B, Tr)
    at, where = torch.unique(read, return_inverse=True)
    out = model(input_ids=ids[None], attention_mask=attention_mask_4d(model, visible), position_ids=pos[None],
                use_cache=False, logits_to_keep=at, output_hidden_states=hidden)
    logits = out.logits[0, where].float() / temperature
    return (logits, out.hidden_states[-1][0, read]) if hidden else logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) log pi(token_t | s_t), nats, from (B, T, V) logits."""
    return torch.gather(F.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) H(pi(.|s_t)) = -sum_v softmax(z)_v log_softmax(z)_v over the FULL vocabulary, nats.
    Differentiable: the entropy bonus of `ent<alpha>` recipes back-propagates through it."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)
