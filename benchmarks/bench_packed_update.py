"""PPO's update forward + backward: packed (`rollout.packed_response_logits`) against the shared-prompt cache.

    python benchmarks/bench_packed_update.py [--policy PATH] [--threads 2]

`rollout.response_logits` computes each distinct prompt once, then indexes its KV cache to every completion's
row and runs the completions on it: the prompt's keys and values are copied per row, and the backward scatters
them back. `rollout.packed_response_logits` (what PPO uses on the model types `rollout.packs` allows) runs one
sequence: each distinct prompt followed by all its completions (each without its last token), under a block
mask letting each completion's tokens see the prompt and their own earlier tokens only, positions restarting
after the prompt for each completion. No per-row copy of the prompt, no padding.

On a 256-completion rollout of the seed prompts from `--policy` (default: the lab's base), minibatches of
64 in micro-batches of 32 as the default PPO update, it prints
1. the largest |Δ log π| between the two forwards over the response tokens (they must agree to float error);
2. seconds for one update's forward + backward of Σ log π (median of 3 after a warm-up) for each, and the ratio.
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
from collapse_lab.rollout import (generate_by_length, length_chunks, packed_response_logits, response_logits, select,
                                  token_logprobs)
from collapse_lab.world import make_world


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
    packed = lambda mb: token_logprobs(packed_response_logits(model, mb), mb.responses)  # noqa: E731
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
