"""Would packing a prompt's completions after ONE copy of it make PPO's update cheaper? (a design probe)

    python benchmarks/bench_packed_update.py [--policy PATH] [--threads 2]

PPO's update forward (`rollout.response_logits`) computes each distinct prompt once, then indexes its KV
cache to every completion's row and runs the completions on it: the prompt's keys and values are expanded
per row, and the backward scatters them back. The alternative measured here: one sequence per distinct
prompt, the prompt followed by all its completions (each without its last token), a 4D block mask letting
each completion's tokens see the prompt and their own earlier tokens only, positions restarting after the
prompt for each completion. No cache, no per-row copy of the prompt.

On a 256-completion rollout of the seed prompts from `--policy` (default: the lab's base), minibatches of
64 in micro-batches of 32 as the default PPO update, it prints
1. the largest |Δ log π| between the two forwards over the response tokens (they must agree to float error);
2. seconds for one update's forward + backward of Σ log π (median of 3 after a warm-up) for each, and the ratio.

A probe, not the lab's forward: this version loops in Python over rows and handles full-attention
decoder models taking 4D boolean masks and position ids (the tiny Llama); PPO does not use it yet.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from collapse_lab.config import compose
from collapse_lab.models import load_pretrained
from collapse_lab.pretrain import resolve_base
from collapse_lab.rollout import Rollout, generate_by_length, length_chunks, response_logits, select, token_logprobs
from collapse_lab.world import make_world


def packed_logprobs(model, r: Rollout, pad_id: int) -> torch.Tensor:
    """(B, Tr) log π(y_t | s_t) of the rollout's responses, from one packed sequence per distinct prompt."""
    q = r.query_len
    prompt_mask = r.attention_mask[:, :q].bool()
    widths = r.response_mask.sum(1).tolist()
    _, group = torch.unique(torch.cat([r.input_ids[:, :q], prompt_mask.long()], 1), dim=0, return_inverse=True)
    seqs, reads = [], []  # per prompt: (tokens, positions, owner row per token); per row: where its logits are
    for g in range(int(group.max()) + 1):
        rows = (group == g).nonzero().flatten().tolist()
        tokens = r.input_ids[rows[0], :q][prompt_mask[rows[0]]].tolist()
        n_prompt = len(tokens)
        positions, owner = list(range(n_prompt)), [-1] * n_prompt
        for i in rows:
            body = r.input_ids[i, q:q + widths[i] - 1].tolist()
            reads.append((i, g, [n_prompt - 1] + list(range(len(tokens), len(tokens) + len(body)))))
            tokens += body
            positions += range(n_prompt, n_prompt + len(body))
            owner += [i] * len(body)
        seqs.append((tokens, positions, owner))
    length = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    pos = torch.zeros((len(seqs), length), dtype=torch.long)
    mask = torch.zeros((len(seqs), 1, length, length), dtype=torch.bool)
    for g, (tokens, positions, owner) in enumerate(seqs):
        n = len(tokens)
        ids[g, :n], pos[g, :n] = torch.tensor(tokens), torch.tensor(positions)
        o = torch.tensor(owner)
        mask[g, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril() & ((o[:, None] == o) | (o == -1)[None, :])
        mask[g, 0, n:, 0] = True  # padding queries see one key (their outputs are never read)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
    out = torch.zeros(r.response_mask.shape)
    for i, g, at in reads:
        w = widths[i]
        out[i, :w] = logits[g, at].log_softmax(-1).gather(1, r.responses[i, :w, None]).squeeze(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None, help="a model directory (default: the lab's base)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose("lab", ["wandb.mode=disabled"])
    model, tok = load_pretrained(args.policy or resolve_base(cfg), "float32")
    model.eval()
    world, rng = make_world(cfg.world), random.Random(0)
    prompts = [q.text for q in (world.train_prompt(rng) for _ in range(32)) for _ in range(8)]
    torch.manual_seed(0)
    r = generate_by_length(model, tok, prompts, cfg.ppo.max_new_tokens, hidden=False, chunk=32)
    m = r.response_mask.bool()

    current = lambda mb: token_logprobs(response_logits(model, mb), mb.responses)  # noqa: E731
    packed = lambda mb: packed_logprobs(model, mb, tok.pad_token_id)  # noqa: E731
    with torch.no_grad():
        diff = (current(r) - packed(r))[m].abs().max()
    print(f"max |Δ log π| over {int(m.sum())} response tokens: {float(diff):.2e}")

    order = (torch.randperm(32)[:, None] * 8 + torch.arange(8)).flatten()

    def update(fn) -> float:
        start = time.perf_counter()
        for s in range(0, len(order), 64):
            for micro in length_chunks(r, order[s:s + 64], 32):
                mb = select(r, micro)
                (fn(mb) * mb.response_mask).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {}
    for name, fn in (("current (shared prefix cache)", current), ("packed", packed)):
        update(fn)
        times[name] = statistics.median(update(fn) for _ in range(3))
        print(f"{name}: {times[name]:.3f} s per update forward + backward")
    a, b = times.values()
    print(f"ratio current / packed: {a / b:.2f}x")


if __name__ == "__main__":
    main()
