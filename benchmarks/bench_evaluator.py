"""How fast is the exact evaluator, and how much faster than sampling to the same precision?

    python benchmarks/bench_evaluator.py [--model PATH] [--suite seed] [--se 0.01]

Without --model: a freshly initialised 4-layer, 256-wide Llama with a 1024-token output layer
(and the byte-level test tokenizer). Measures, in one run:

1. exact: seconds for `answer_distribution` over every answer prompt of the suite (median of 3, after a warm-up);
2. sampling: samples/s of `sample()` with max_new_tokens = longest answer + 1 (just enough to read an answer);
3. the samples that estimating the answer entropy from counts needs for an error of --se nats: the smallest N
   (on a grid of ratio 1.25) at which the Miller–Madow estimate Ĥ + (m − 1)/(2N) (m = answers seen) has
   RMSE ≤ --se around the exact H, simulated with 200 multinomial draws of N answers from q = p/M (the exact
   normalised distribution). RMSE, not the delta-method SE √(Var_q[−log q(a)]/N): near-uniform q (a model
   that does NOT collapse) has Var_q[−log q(a)] ≈ 0, and the estimator's error there is bias and
   second-order variance. Only a share M of samples is an answer, so samples = N / M.
Prints the time ratio sampling / exact for each prompt and for the suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from collapse_lab.evaluation.evaluator import answer_distribution, answer_token_ids, sample
from collapse_lab.core.suites import load_suite


def fallback_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import byte_level_tokenizer

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=512, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok, "fresh 4x256 Llama, V=1024"


def answers_needed(q: np.ndarray, target: float, rng: np.random.Generator, reps: int = 200) -> int:
    """Smallest N (grid ×1.25) with RMSE of the Miller–Madow entropy estimate from N draws of q ≤ target (nats)."""
    h = -(q * np.log(q)).sum()
    n = 16
    while True:
        counts = rng.multinomial(n, q, size=reps)  # (reps, |A|)
        f = counts / n
        plug_in = -(f * np.log(np.where(f > 0, f, 1))).sum(1)
        miller_madow = plug_in + ((counts > 0).sum(1) - 1) / (2 * n)
        if np.sqrt(((miller_madow - h) ** 2).mean()) <= target:
            return n
        n = int(n * 1.25) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory or hub name (default: a fresh tiny Llama)")
    ap.add_argument("--suite", default="seed")
    ap.add_argument("--se", type=float, default=0.01, help="target RMSE of the sampled answer-entropy estimate, nats")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tok, name = AutoTokenizer.from_pretrained(args.model), args.model
    else:
        model, tok, name = fallback_model()
    prompts = [p for p in load_suite(args.suite).prompts if p.answers is not None]
    print(f"model: {name}; suite: {args.suite} ({len(prompts)} answer prompts); torch threads: {torch.get_num_threads()}")

    def exact():
        return [answer_distribution(model, tok, p.text, p.answers, p.continue_chars, args.batch_size) for p in prompts]

    dists = exact()  # warm-up (and the end-mask cache, built once per tokenizer)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        exact()
        times.append(time.perf_counter() - t0)
    t_exact = statistics.median(times)
    print(f"exact, whole suite: {t_exact:.3f} s (median of 3; {t_exact / len(prompts) * 1e3:.0f} ms per prompt)")

    total_sampling, rng = 0.0, np.random.default_rng(0)
    print(f"{'prompt':<16}{'M':>8}{'H (nats)':>10}{'samples/s':>11}{'samples needed':>16}{'sampling (s)':>14}{'ratio':>10}")
    for p, d in zip(prompts, dists):
        new_tokens = max(map(len, answer_token_ids(tok, p.answers))) + 1
        n = 256
        t0 = time.perf_counter()
        sample(model, tok, p.text, n, 1.0, new_tokens, args.batch_size)
        rate = n / (time.perf_counter() - t0)  # samples/s
        q, M = d.normalised, float(d.probs.sum())
        needed = answers_needed(q, args.se, rng) / M
        t_sampling = needed / rate
        total_sampling += t_sampling
        ratio = t_sampling / (t_exact / len(prompts))
        print(f"{p.id:<16}{M:>8.3f}{-(q * np.log(q)).sum():>10.3f}{rate:>11.0f}{needed:>16.3g}{t_sampling:>14.3g}{ratio:>9.3g}x")
    print(f"suite: exact {t_exact:.3f} s vs sampling to RMSE {args.se} nats {total_sampling:.3g} s "
          f"-> {total_sampling / t_exact:.3g}x faster (target >= 100x; exact target <= 2 s)")


if __name__ == "__main__":
    main()
