"""The shared entropy evaluator: exact answer distributions, sampling metrics, KL to a reference.

For a model m, a prompt x and an answer set A (strings), the evaluator computes exactly

    p(a) = P_m(tokens of a | x) · P_m(end | x, a)

by teacher forcing, where "tokens of a" is the CANONICAL tokenisation only: the prompt encoded
once with the tokenizer's leading special tokens (e.g. a BOS; `tokenizer.encode_texts`), each answer
encoded separately with add_special_tokens=False (or, where that differs, as the tokenizer encodes it
right after the prompt: `answer_token_ids`), concatenated. Other token sequences that spell the same
text are not counted. "end" is the total next-token mass of the tokens whose text does not begin with a
character of `continue_chars` (default: digits for integer answers, regex \\w for word lists),
so " 3" and " 37" are distinct, disjoint events and Σ_a p(a) ≤ 1 whatever the tokenizer.
Definitions of every recorded field: eval/README.md.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import GenerationConfig

from collapse_lab.evaluation import metrics
from collapse_lab.evaluation.best_of_k import load_policy
from collapse_lab.core.checkpoint import package_versions, read_manifest
from collapse_lab.core.config import ConfigError, check_output
from collapse_lab.evaluation.optimum import optimum_tv, prompt_optimum, run_objective
from collapse_lab.evaluation.plots import plot_suite
from collapse_lab.models.models import load_pretrained
from collapse_lab.models.real_models import resolve as resolve_real
from collapse_lab.core.suites import Prompt, Suite, SuiteError, load_suite
from collapse_lab.models.tokenizer import answer_token_ids, decode_continuations, encode_texts
from collapse_lab.world.world import make_world

SCHEMA_VERSION = 1
SAMPLING_SETTINGS = ("sampling.n", "sampling.temperature", "sampling.max_new_tokens")  # not averaged

# ----------------------------------------------------------------------------- exact answers

_END_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def continuation_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id adds when appended to ordinary text.

    text(t) = decode([r, t]) minus decode([r]) for a plain reference token r (the tokens of "a"),
    so SentencePiece "▁3" gives " 3", as it would mid-text (decode([t]) alone drops that space).
    Special tokens decode to their own text (e.g. "</s>"); ids beyond the tokenizer (a padded
    embedding) add "".
    """
    ref = tokenizer("a", add_special_tokens=False)["input_ids"]
    base = tokenizer.decode(ref, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    n = min(len(tokenizer), vocab_size)
    pairs = tokenizer.batch_decode([ref + [t] for t in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    texts = [s[len(base):] if s.startswith(base) else tokenizer.decode([t]) for t, s in enumerate(pairs)]
    return texts + [""] * (vocab_size - n)


def continues(text: str, continue_chars: Optional[str]) -> bool:
    """Does this next text continue the answer? Its first character is in continue_chars (None: \\w)."""
    if not text:
        return False
    return text[0] in continue_chars if continue_chars is not None else re.match(r"\w", text[0]) is not None


def end_mask(tokenizer, continue_chars: Optional[str], vocab_size: int) -> torch.Tensor:
    """(V,) bool: True where token t ends an answer. Cached per tokenizer and continue_chars, and across
    tokenizer objects by their vocabulary and decoder (every regime of an ablation loads its own copy of
    the base's tokenizer; decoding a 262,144-token vocabulary takes tens of seconds on a CPU)."""
    cache = _END_MASKS.setdefault(tokenizer, {})
    key = (continue_chars, vocab_size)
    if key not in cache:
        same = (_vocab_key(tokenizer), *key)
        if same not in _END_MASKS_BY_VOCAB:
            texts = continuation_texts(tokenizer, vocab_size)
            _END_MASKS_BY_VOCAB[same] = torch.tensor([not continues(s, continue_chars) for s in texts])
        cache[key] = _END_MASKS_BY_VOCAB[same]
    return cache[key]


_END_MASKS_BY_VOCAB: dict = {}


def _vocab_key(tokenizer) -> tuple:
    """What `continuation_texts` depends on: the tokenizer's class, its vocabulary (ids and strings,
    added tokens included) and its decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (type(tokenizer).__name__, len(tokenizer), hash(frozenset(tokenizer.get_vocab().items())),
            repr(backend.decoder) if backend is not None else None)


@dataclass
class AnswerDistribution:
    answers: list[str]
    logprobs: np.ndarray  # (A,) log p(a), nats, unnormalised (Σ exp ≤ 1)
    next_token_entropy: float  # nats, full vocabulary, right after the prompt
    vocab_size: int  # V, the model's output dimension
    # (A,) log P(tokens of a, then EOS | x): the part of p(a) that ends the text right there (the
    # rater's "ends cleanly"); None when the tokenizer has no EOS
    eos_logprobs: Optional[np.ndarray] = None

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logprobs)

    @property
    def normalised(self) -> np.ndarray:
        """p/M, computed in log space."""
        return np.exp(self.logprobs - np.logaddexp.reduce(self.logprobs))


def _prompt_forward(model, tokenizer, prompt_text: str):
    """The prompt (with the tokenizer's special tokens) through the model once: (output with KV cache, (V,) log p(·|x))."""
    model.eval()
    prompt = torch.tensor(encode_texts(tokenizer, [prompt_text]), device=model.device)  # (1, P)
    out = model(prompt, use_cache=True, logits_to_keep=1)  # the LM head at the last position only (V up to 262k)
    return out, out.logits[0, -1].float().log_softmax(-1)


def _entropy(logp: torch.Tensor) -> float:
    """H = −Σ_t p(t) log p(t) from (V,) log-probs (nats; 0·log 0 = 0)."""
    return float(torch.special.entr(logp.exp()).sum())


@torch.no_grad()
def next_token_entropy(model, tokenizer, prompt_text: str) -> float:
    """H(p(·|x)) over the full vocabulary, right after the prompt (nats)."""
    return _entropy(_prompt_forward(model, tokenizer, prompt_text)[1])


@torch.no_grad()
def answer_distribution(model, tokenizer, prompt_text: str, answers: list[str],
                        continue_chars: Optional[str], batch_size: int = 128) -> AnswerDistribution:
    """Exact p(a) for every answer: the prompt once (KV cache), then each answer-trie node once.

    log p(a) = Σ_i log P(a_i | x, a_<i) + log P(end | x, a), read off the trie of the answers'
    canonical tokens: a node's logits give its children's token probabilities and its own end
    mass, so " 3" (a prefix of " 37") costs nothing extra. Two ways to run the trie, same result:
    - tree attention: all nodes in ONE sequence after the cached prompt, a 4D mask letting each
      node see only the prompt and its ancestors, position = prompt length + depth - 1;
    - leaf batches: each trie leaf as its own row (shared prefixes recomputed), batch_size rows.
    Tree attention is used once it has matched leaf batches on this model (checked on its first
    prompt); architectures whose attention ignores 4D masks fall back to leaf batches.
    """
    seqs = answer_token_ids(tokenizer, answers, prompt_text)
    out, first = _prompt_forward(model, tokenizer, prompt_text)
    ends = end_mask(tokenizer, continue_chars, first.shape[-1]).to(first.device)  # (V,)
    eos = tokenizer.eos_token_id
    if model not in _TREE_OK:
        leaf = _leaf_logprobs(model, out.cache, first, seqs, ends, batch_size, eos)
        try:
            tol = 1e-4 if model.dtype == torch.float32 else 0.1  # nats; half precision is noisy
            tree = _tree_logprobs(model, out.cache, first, seqs, ends, eos)
            _TREE_OK[model] = np.allclose(tree[0], leaf[0], atol=tol)
        except Exception:  # an architecture without 4D-mask support (e.g. ALiBi models)
            _TREE_OK[model] = False
        # the method every later call on this model uses: a result never depends on whether it came first
        # (a resumed run evaluates its policy first at a later step than the uninterrupted one did)
        logprobs, eos_logprobs = tree if _TREE_OK[model] else leaf
    elif _TREE_OK[model]:
        logprobs, eos_logprobs = _tree_logprobs(model, out.cache, first, seqs, ends, eos)
    else:
        logprobs, eos_logprobs = _leaf_logprobs(model, out.cache, first, seqs, ends, batch_size, eos)
    return AnswerDistribution(answers, logprobs, _entropy(first), first.shape[-1], eos_logprobs)


_TREE_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> tree attention verified


def answer_trie(seqs: list[tuple[int, ...]]) -> tuple[dict[tuple[int, ...], int], list[int], list[int]]:
    """The trie of the answers' token sequences: ({token prefix: node index}, each node's parent index (−1: the
    prompt), each node's depth (1: the first answer token)); parents come before their children."""
    node: dict[tuple[int, ...], int] = {}
    parent, depth = [], []
    for s in seqs:
        for d in range(1, len(s) + 1):
            if s[:d] not in node:
                node[s[:d]] = len(parent)
                parent.append(node[s[: d - 1]] if d > 1 else -1)
                depth.append(d)
    return node, parent, depth


def _tree_logprobs(model, prompt_cache, first: torch.Tensor, seqs: list[tuple[int, ...]], ends: torch.Tensor,
                   eos: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(A,) log p(a) and (A,) log P(a, EOS) (None without `eos`): every trie node in one forward pass
    with a tree-attention mask."""
    node, parent, depth = answer_trie(seqs)
    Q, P = len(parent), prompt_cache.get_seq_length()
    device = first.device
    tokens = torch.tensor([[prefix[-1] for prefix in node]], device=device)  # (1, Q)
    sees = torch.zeros(Q, P + Q, dtype=torch.bool, device=device)  # (Q, P+Q): the prompt and the ancestors
    sees[:, :P] = True
    for i in range(Q):
        j = i
        while j != -1:
            sees[i, P + j], j = True, parent[j]
    mask = torch.zeros(1, 1, Q, P + Q, device=device, dtype=model.dtype).masked_fill(~sees, -math.inf)
    positions = torch.tensor([[P + d - 1 for d in depth]], device=device)  # (1, Q)
    lp = model(tokens, cache=copy.deepcopy(prompt_cache), attention_mask=mask, position_ids=positions,
               use_cache=True).logits[0].float().log_softmax(-1)  # (Q, V)
    parents = torch.tensor(parent, device=device)
    step_lp = torch.where(parents < 0, first[tokens[0]], lp[parents.clamp(min=0), tokens[0]])  # (Q,) log P(token | parent)
    prefix_lp = step_lp.double().cpu().numpy()
    for i, j in enumerate(parent):  # cumulative along the path: parents are already final
        if j >= 0:
            prefix_lp[i] += prefix_lp[j]
    end_lp = lp.masked_fill(~ends, -math.inf).logsumexp(-1).double().cpu().numpy()  # (Q,) log P(end | node)
    at = [node[s] for s in seqs]
    eos_lp = None if eos is None else prefix_lp[at] + lp[:, eos].double().cpu().numpy()[at]
    return prefix_lp[at] + end_lp[at], eos_lp


def _leaf_logprobs(model, prompt_cache, first: torch.Tensor, seqs: list[tuple[int, ...]], ends: torch.Tensor,
                   batch_size: int, eos: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(A,) log p(a) and (A,) log P(a, EOS) (None without `eos`): trie leaves as rows of batched
    forward passes over the expanded prompt cache."""
    device = first.device
    order = sorted(set(seqs))
    leaves = [s for s, nxt in zip(order, order[1:] + [()]) if nxt[: len(s)] != s]
    leaf_of = {s: next(i for i, leaf in enumerate(leaves) if leaf[: len(s)] == s) for s in seqs}
    leaf_lp, leaf_eos = [], []  # per leaf: (L,) log p(answer = leaf[:i+1]) (and with EOS) per prefix length i+1
    for start in range(0, len(leaves), batch_size):
        chunk = leaves[start : start + batch_size]
        L = max(map(len, chunk))
        # Right padding with token 0: causal attention keeps it out of every position we read.
        tokens = torch.tensor([s + (0,) * (L - len(s)) for s in chunk], device=device)  # (B, L)
        cache = copy.deepcopy(prompt_cache)  # the prompt's KV cache, (1, P) → (B, P)
        cache.batch_repeat_interleave(len(chunk))
        lp = model(tokens, cache=cache, use_cache=True).logits.float().log_softmax(-1)  # (B, L, V)
        tok_lp = torch.cat([first[tokens[:, :1]], lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]], 1)  # (B, L)
        end_lp = lp.masked_fill(~ends, -math.inf).logsumexp(-1)  # (B, L) log P(end | x, prefix)
        leaf_lp += list((tok_lp.cumsum(1) + end_lp).double().cpu().numpy())
        if eos is not None:
            leaf_eos += list((tok_lp.cumsum(1) + lp[..., eos]).double().cpu().numpy())
    eos_lp = None if eos is None else np.array([leaf_eos[leaf_of[s]][len(s) - 1] for s in seqs])
    return np.array([leaf_lp[leaf_of[s]][len(s) - 1] for s in seqs]), eos_lp


def answer_index(tokens: list[int], answer_seqs: list[tuple[int, ...]], ends: torch.Tensor) -> Optional[int]:
    """Which answer a sampled token sequence is: its first k tokens are the answer's and token k ends it."""
    for i, s in enumerate(answer_seqs):
        k = len(s)
        if len(tokens) > k and tuple(tokens[:k]) == s and bool(ends[tokens[k]]):
            return i
    return None


# --------------------------------------------------------------------------------- sampling


@dataclass
class Samples:
    tokens: list[list[int]]  # generated ids per sample, EOS included when it came
    logprobs: np.ndarray  # (n,) log p_T(y | x), nats, EOS included
    finished: np.ndarray  # (n,) bool: ended with EOS within max_new_tokens


@torch.no_grad()
def sample(model, tokenizer, prompt_text: str, n: int, temperature: float, max_new_tokens: int,
           batch_size: int = 128) -> Samples:
    """n ancestral samples at `temperature` (no top-k/top-p), with log-probs at that same temperature."""
    model.eval()
    device = model.device
    prompt = torch.tensor(encode_texts(tokenizer, [prompt_text]), device=device)  # (1, P)
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                           return_dict_in_generate=True, output_scores=True)
    tokens, logprobs, finished = [], [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        batch = prompt.expand(b, -1)  # (b, P)
        out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=gen)
        new = out.sequences[:, prompt.shape[1]:]  # (b, T)
        # scores are the processed logits z/T, so this is log softmax(z/T) of each sampled token
        lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (b, T)
        for row, row_lp in zip(new.tolist(), lp.double().cpu().numpy()):
            k = row.index(eos) + 1 if eos in row else len(row)
            tokens.append(row[:k])
            logprobs.append(row_lp[:k].sum())
            finished.append(eos in row)
    return Samples(tokens, np.array(logprobs), np.array(finished))


def sampling_metrics(tokenizer, samples: Samples, prompt: Prompt, temperature: float, max_new_tokens: int,
                     ends: Optional[torch.Tensor] = None) -> dict:
    """Sequence entropy ± SE, distinct-n, loops; well-formed share (answer sets) or category shares."""
    eos = tokenizer.eos_token_id
    body = [[t for t in y if t != eos] for y in samples.tokens]  # EOS is not text
    texts = decode_continuations(tokenizer, encode_texts(tokenizer, [prompt.text]) * len(body), body)
    h, se = metrics.sequence_entropy(samples.logprobs)
    rec = {"n": len(body), "temperature": temperature, "max_new_tokens": max_new_tokens,
           "sequence_entropy": h, "sequence_entropy_se": se, "truncated_rate": float(1 - samples.finished.mean()),
           "distinct_1": metrics.distinct_n(body, 1), "distinct_2": metrics.distinct_n(body, 2),
           "repetition_loop_rate": metrics.repetition_loop_rate(body), "examples": texts[:5]}
    if prompt.answers is not None:
        seqs = answer_token_ids(tokenizer, prompt.answers, prompt.text)
        rec["well_formed_rate"] = float(np.mean([answer_index(y, seqs, ends) is not None for y in samples.tokens]))
    if prompt.categories:
        rec["category_shares"] = {k: float(np.mean([re.search(rx, t) is not None for t in texts]))
                                  for k, rx in prompt.categories.items()}
    return rec


# ----------------------------------------------------------------------------- per prompt


def evaluate_prompt(model, tokenizer, prompt: Prompt, cfg: DictConfig, reference=None, policy=None,
                    objective: Optional[dict] = None, loaded: Optional["Loaded"] = None) -> dict:
    """One prompt's record (fields: eval/README.md). reference: (model, tokenizer) or None. loaded: the
    models' `Loaded`, whose kept reference distributions and samples are used (and filled) here.

    policy: a best-of-k policy over `model` (collapse_lab/evaluation/best_of_k.py): exact answer distributions only.
    objective: the run's own objective ({beta, alpha, world}; `optimum.run_objective`): with a
    reference, the closed-form π* on this prompt and the model's TV to it."""
    rec: dict = {"id": prompt.id, "prompt": prompt.text}
    ends = None
    if policy is not None and prompt.answers is None:
        return rec  # best-of-k has a closed form on answer sets only
    if prompt.answers is None:
        rec["next_token_entropy"] = next_token_entropy(model, tokenizer, prompt.text)
    else:
        dist = answer_distribution(model, tokenizer, prompt.text, prompt.answers, prompt.continue_chars, cfg.batch_size)
        if policy is not None:
            dist = policy.transform(prompt.text, dist)
        p, q = dist.probs, dist.normalised
        top = int(np.argmax(p))
        ends = end_mask(tokenizer, prompt.continue_chars, dist.vocab_size)
        rec.update(answers=prompt.answers, answer_probs=p.tolist(), valid_mass=float(p.sum()),
                   answer_entropy=metrics.entropy(q), max_entropy=math.log(len(p)), top_answer=prompt.answers[top],
                   top_prob=float(p[top]), entropy_upper_bound=metrics.entropy_upper_bound(p, dist.vocab_size),
                   next_token_entropy=dist.next_token_entropy)
        if prompt.correct is not None:
            rec.update(correct=prompt.correct, correct_prob=float(q[prompt.answers.index(prompt.correct)]))
        if reference is not None:
            ref = (loaded or Loaded()).answer_distribution(*reference, prompt, cfg.batch_size)
            q_ref = ref.normalised
            kl = metrics.kl(q, q_ref)
            rec.update(reference_answer_probs=ref.probs.tolist(), reference_valid_mass=float(ref.probs.sum()),
                       reference_answer_entropy=metrics.entropy(q_ref), kl_to_reference=kl,
                       tv_to_reference=metrics.tv(q, q_ref), pinsker_tv_bound=metrics.pinsker_tv_bound(kl),
                       fannes_entropy_bound=metrics.fannes_entropy_bound(metrics.pinsker_tv_bound(kl), len(q)),
                       entropy_change=metrics.entropy(q) - metrics.entropy(q_ref),
                       entropy_cross_term=metrics.entropy_cross_term(q, q_ref))  # ΔH = −KL − this, exactly
            target = None if objective is None else prompt_optimum(
                objective["world"], prompt.text, prompt.answers, ref, objective["beta"], objective["alpha"])
            if target is not None:
                rec.update(optimum_answer_probs=target.tolist(), optimum_tv=optimum_tv(p, target),
                           optimum_answer_entropy=metrics.entropy(target), optimum_kl_to_reference=metrics.kl(target, q_ref))
    if cfg.sampling.n > 0 and policy is None:
        # each prompt's samples depend only on the seed and the prompt
        s = (loaded or Loaded()).sample(model, tokenizer, prompt.text, cfg.sampling.n, cfg.sampling.temperature,
                                        cfg.sampling.max_new_tokens, cfg.batch_size, cfg.seed)
        rec["sampling"] = sampling_metrics(tokenizer, s, prompt, cfg.sampling.temperature,
                                           cfg.sampling.max_new_tokens, ends)
    return rec


# ------------------------------------------------------------------------------ the suite


def summarise(records: list[dict]) -> dict:
    """Means over prompts of every numeric field (sampling ones as "sampling.<field>"), ECE and Brier."""
    values: dict[str, list[float]] = {}
    for rec in records:
        flat = {**rec, **{f"sampling.{k}": v for k, v in rec.get("sampling", {}).items()}}
        for k, v in flat.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SAMPLING_SETTINGS:
                values.setdefault(k, []).append(float(v))
    summary: dict = {"means": {k: float(np.mean(v)) for k, v in values.items()}}
    calib = [r for r in records if "correct" in r]
    if calib:
        q = [np.asarray(r["answer_probs"]) / r["valid_mass"] for r in calib]
        correct = [r["answers"].index(r["correct"]) for r in calib]
        summary["ece"] = metrics.ece([x.max() for x in q], [int(np.argmax(x)) == c for x, c in zip(q, correct)])
        summary["brier"] = metrics.brier(q, correct)
    return summary


def _load(path: str, device: str, dtype: str):
    """(model, tokenizer) on `device`, in eval mode; ConfigError (one line) if it cannot be loaded."""
    model, tokenizer = load_pretrained(path, dtype)
    return model.to(device).eval(), tokenizer


class Loaded:
    """Models loaded once for several evaluator runs (`run(cfg, loaded)`: every suite of a model and its
    gold reward in collapse-lab ablate), with what is computed from them kept: a reference's answer
    distribution per prompt (the base is the reference of every evaluation of an ablation) and a model's
    seeded samples per prompt and settings (the seed suite's are the gold reward's). A model in here is
    never trained, so whatever is kept is what a new computation would give."""

    def __init__(self):
        self.models: dict[tuple, tuple] = {}  # (path, device, dtype) -> (model, tokenizer)
        self.kept: dict[tuple, object] = {}  # (path, device, dtype, what...) -> distribution or samples

    def load(self, path: str, device: str, dtype: str):
        key = (str(path), device, dtype)
        if key not in self.models:
            self.models[key] = _load(str(path), device, dtype)
        return self.models[key]

    def _once(self, model, what: tuple, compute):
        key = next((k for k, m in self.models.items() if m[0] is model), None)
        if key is None:  # not loaded here: nothing kept
            return compute()
        if (*key, *what) not in self.kept:
            self.kept[(*key, *what)] = compute()
        return self.kept[(*key, *what)]

    def answer_distribution(self, model, tokenizer, prompt: Prompt, batch_size: int) -> AnswerDistribution:
        return self._once(model, ("answers", prompt.text, tuple(prompt.answers), prompt.continue_chars),
                          lambda: answer_distribution(model, tokenizer, prompt.text, prompt.answers,
                                                      prompt.continue_chars, batch_size))

    def sample(self, model, tokenizer, prompt_text: str, n: int, temperature: float, max_new_tokens: int,
               batch_size: int, seed: int) -> Samples:
        """`sample` right after torch.manual_seed(seed)."""
        def draw() -> Samples:
            torch.manual_seed(seed)
            return sample(model, tokenizer, prompt_text, n, temperature, max_new_tokens, batch_size)
        return self._once(model, ("samples", prompt_text, n, temperature, max_new_tokens, batch_size, seed), draw)

    def forget(self, keep: str) -> None:
        """Release every model (and what was kept from it) but those loaded from `keep`."""
        for store in (self.models, self.kept):
            for key in [k for k in store if k[0] != str(keep)]:
                del store[key]


def _check_fits(model, tokenizer, suite: Suite, max_new_tokens: int, n_samples: int, path: str) -> None:
    """ConfigError if an answer's tokens are degenerate or prompt + answer (+ samples) exceeds the context."""
    cfg = model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    for p in suite.prompts:
        n_prompt = len(encode_texts(tokenizer, [p.text])[0])
        longest = 0
        if p.answers is not None:
            try:
                longest = max(map(len, answer_token_ids(tokenizer, p.answers, p.text)))
            except ValueError as e:
                raise ConfigError(f"suite {suite.path}: prompt '{p.id}': {e} with the tokenizer of {path}") from None
        need = n_prompt + max(longest, max_new_tokens if n_samples > 0 else 0)
        if context is not None and need > context:
            raise ConfigError(f"suite {suite.path}: prompt '{p.id}' needs {need} tokens (prompt {n_prompt} + longest "
                              f"answer {longest} or max_new_tokens), longer than the context ({context}) of {path}")


def _check_finished(path: Optional[str], allow_unfinished: bool) -> None:
    """A lab run directory (manifest.json) whose run has not finished holds no final model, or a stale one:
    refused unless allow_unfinished=true, which evaluates it with a warning."""
    manifest = read_manifest(Path(path)) if path else None
    if manifest is None or manifest.get("status") == "finished":
        return
    if not allow_unfinished:
        raise ConfigError(f"{path} is an unfinished lab run (status {manifest.get('status')}); finish it, "
                          "or give allow_unfinished=true to evaluate what it holds")
    print(f"warning: evaluating {path}, an unfinished lab run (status {manifest.get('status')})", file=sys.stderr)


def default_out(model_path: str, suite_name: str) -> Path:
    """<model>/eval/<suite>.json for a lab checkpoint (has manifest.json); else checkpoints/eval/<model>/<suite>.json."""
    if (Path(model_path) / "manifest.json").is_file():
        return Path(model_path) / "eval" / f"{suite_name}.json"
    return Path("checkpoints") / "eval" / model_path.strip("/").replace("/", "__") / f"{suite_name}.json"


def _jsonable(x):
    """NaN/inf → None (strict JSON); numpy scalars → Python."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def run(cfg: DictConfig, loaded: Optional[Loaded] = None) -> dict:
    """Evaluate cfg.model_path (and cfg.reference_path) on cfg.suite; write <out>.json and <out>.png.
    `loaded`: models (and reference distributions) kept from and for other runs in this process.

    Every input is validated (ConfigError) before anything is written.
    """
    start = time.time()
    try:
        suite = load_suite(cfg.suite)
    except SuiteError as e:
        raise ConfigError(str(e)) from None
    s = cfg.sampling
    if s.n < 0 or s.temperature <= 0 or s.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ConfigError(f"need sampling.n >= 0, sampling.temperature > 0, sampling.max_new_tokens >= 1, "
                          f"batch_size >= 1; got {s.n}, {s.temperature}, {s.max_new_tokens}, {cfg.batch_size}")
    # real:<name> / a .gguf file: its dequantised directory (collapse_lab/models/real_models.py), made once
    cfg.model_path, cfg.reference_path = resolve_real(cfg.model_path), resolve_real(cfg.reference_path)
    out = Path(cfg.out) if cfg.out else default_out(cfg.model_path, suite.name)
    check_output(out, "out")
    for path in (cfg.model_path, cfg.reference_path):
        _check_finished(path, cfg.allow_unfinished)
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device = cfg.device
    loaded = loaded or Loaded()
    policy = load_policy(cfg.model_path)  # a best-of-k directory: its base, transformed per prompt
    model, tokenizer = loaded.load(policy.base_path if policy else cfg.model_path, device, cfg.dtype)
    _check_fits(model, tokenizer, suite, s.max_new_tokens, s.n, cfg.model_path)
    reference = None
    if cfg.reference_path:
        reference = loaded.load(cfg.reference_path, device, cfg.dtype)
        _check_fits(*reference, suite, s.max_new_tokens, 0, cfg.reference_path)

    objective = run_objective(cfg.model_path) if policy is None and reference is not None else None
    if objective is not None:
        objective = {**objective, "world": make_world(objective["world"])}
    records = [evaluate_prompt(model, tokenizer, p, cfg, reference, policy, objective, loaded) for p in suite.prompts]
    summary = {"schema_version": SCHEMA_VERSION, "suite": suite.name, "suite_path": str(suite.path),
               "model_path": cfg.model_path, "reference_path": cfg.reference_path,
               "vocab_size": model.get_output_embeddings().weight.shape[0], "n_prompts": len(records),
               "sampling": {"n": s.n, "temperature": s.temperature, "max_new_tokens": s.max_new_tokens},
               "seed": cfg.seed, "device": device, "dtype": cfg.dtype, **summarise(records),
               **({"optimum": {k: objective[k] for k in ("beta", "alpha", "reward")}} if objective else {}),
               "versions": package_versions(),
               "wall_time_s": time.time() - start}
    result = _jsonable({"summary": summary, "prompts": records})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if cfg.plots:
        plot_suite(records, f"{cfg.model_path} on suite '{suite.name}'", out.with_suffix(".png"))
    if cfg.verbose:
        print_table(records, f"{cfg.model_path} on suite '{suite.name}' -> {out}")
    return result


def print_table(records: list[dict], title: str) -> None:
    """The post's table for the terminal: per answer prompt, M, H/log|A|, top answer (and KL)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("prompt", "valid mass M", "H (nats)", "H / log|A|", "top answer", "top p(a)", "KL to ref (nats)"):
        table.add_column(col, justify="left" if col in ("prompt", "top answer") else "right")
    for r in records:
        if "answers" in r:
            kl = r.get("kl_to_reference")
            table.add_row(r["id"], f"{r['valid_mass']:.3f}", f"{r['answer_entropy']:.3f}",
                          f"{r['answer_entropy'] / r['max_entropy']:.3f}", repr(r["top_answer"]), f"{r['top_prob']:.3f}",
                          "-" if kl is None else f"{kl:.4f}")
        elif "sampling" in r:
            table.add_row(r["id"], "-", f"seq {r['sampling']['sequence_entropy']:.2f}", "-", "-", "-", "-")
    Console(width=140).print(table)
