"""PPO's packed forwards against the per-row KV-cache path: sampling, and the update's forward + backward.

    python benchmarks/bench_packed.py [--policy PATH] [--threads 2]

The cache path copies each distinct prompt's keys and values to every completion's row: sampling decodes
each row on its own copy (`rollout.CacheDecoder`, every row of a chunk until the chunk's last one ends), and
the update's forward (`rollout.response_logits`) runs the completions on the indexed cache, whose backward
scatters the copies' gradients back. The packed path (what PPO uses on the model types `rollout.packs`
allows) runs ONE sequence: each distinct prompt once and its completions after it, under a block-causal
mask by which a completion sees its prompt and its own earlier tokens only, positions counting on from the
prompt's length. Sampling appends each step's tokens of the rows still going (`rollout.PackedDecoder`);
the update runs all of a micro-batch's completions in one pass (`rollout.packed_response_logits`).

On 256 completions of the seed prompts (32 prompts x 8, as a default PPO step) from `--policy` (default:
the lab's base), it prints, each time the median of 3 after a warm-up:
1. sampling: whether both paths draw the same tokens from the same seed (in the same chunks), and seconds
   per rollout for the cache path in chunks of 32 prompts (its best: each chunk pays its longest prompt) and the packed
   path in one chunk (`ppo.generation_batch_size`, 256), and the ratio;
2. the update: the largest |Δ log π| between the two forwards over the response tokens, and seconds for one
   default update's forward + backward of Σ log π (minibatches of 64, micro-batches of 32), and the ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
from collapse_lab.core.config import compose
from collapse_lab.models.models import load_pretrained
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.models.rollout import (generate_by_length, length_chunks, packed_response_logits, packs, response_logits,
                                  select, token_logprobs)
from collapse_lab.world.world import make_world


def median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None, help="a model directory (default: the lab's base)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose("lab", ["wandb.mode=disabled"])
    model, tok = load_pretrained(args.policy or resolve_base(cfg), "float32")
    model.eval()
    assert packs(model), "the packed path needs a model type rollout.packs allows"
    world, rng = make_world(cfg.world), random.Random(0)
    prompts = [q.text for q in (world.train_prompt(rng) for _ in range(32)) for _ in range(8)]

    def sample(packed: bool, chunk: int):
        torch.manual_seed(0)
        return generate_by_length(model, tok, prompts, cfg.ppo.max_new_tokens, hidden=True, chunk=chunk, packed=packed)

    same = torch.equal(sample(False, 32).input_ids, sample(True, 32).input_ids)  # the same chunks: the same draws
    print(f"sampling: the same tokens from the same seed (both in chunks of 32): {same}")
    cache_s = median_seconds(lambda: sample(False, 32))
    packed_s = median_seconds(lambda: sample(True, cfg.ppo.generation_batch_size))
    print(f"sampling 256 completions: cache path (chunks of 32) {cache_s:.3f} s, packed "
          f"(chunk of {cfg.ppo.generation_batch_size}) {packed_s:.3f} s: ratio {cache_s / packed_s:.2f}x")

    r = sample(True, 256)
    r.hidden = None
    m = r.response_mask.bool()
    current = lambda mb: token_logprobs(response_logits(model, mb), mb.responses)  # noqa: E731
    packed = lambda mb: token_logprobs(packed_response_logits(model, mb), mb.responses)  # noqa: E731
    with torch.no_grad():
        diff = (current(r) - packed(r))[m].abs().max()
    print(f"update: max |Δ log π| over {int(m.sum())} response tokens: {float(diff):.2e}")
    order = (torch.randperm(32)[:, None] * 8 + torch.arange(8)).flatten()

    def update(fn) -> None:
        for s in range(0, len(order), 64):
            for micro in length_chunks(r, order[s:s + 64], 32):
                mb = select(r, micro)
                (fn(mb) * mb.response_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    a, b = median_seconds(lambda: update(current)), median_seconds(lambda: update(packed))
    print(f"update forward + backward: cache path {a:.3f} s, packed {b:.3f} s: ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
