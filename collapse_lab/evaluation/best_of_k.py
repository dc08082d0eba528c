"""Best-of-k's closed form (the regime `recipe=bok` trains nothing: the policy is "sample k from the base, keep
the one the rater scores highest"). Its exact answer distribution is a closed form of the base's.

    P(a) = F(≤a)^k − F(<a)^k        F(≤a) = base mass on answers rated no better than a

Ties (answers with the same score) are split in proportion to the base's mass: the kept sample is
a uniformly random one among the tied best samples (equivalently the first of them, the samples being
i.i.d.), so with S(a) the answers scored like a and G the base's score distribution,

    P(a) = π0(a) / π0(S(a)) · [G(≤s(a))^k − G(<s(a))^k]

which is the formula above whenever a has no tie. FeedME with top-1 of k (collapse_lab/regimes/sft.py) is the
distillation of this policy: on the one-token bandit it must reproduce it (tests/test_sft.py).

Scores are the rater's EXPECTED (noiseless) score, `world.rater.expected`; on world=bandit the rater is
noiseless anyway. On an answer suite (the seed prompts) the answers are the suite's answer set A plus
one "other" outcome holding the base's remaining mass 1 − M (invalid or non-ending completions). The
gold rater scores every completion outside A strictly below every answer in A (an in-range number that
ends cleanly gets ≥ 6, anything else ≤ 5), so "other" is scored below all answers and the result is exact
for A whatever "other" holds: best-of-k's valid mass is 1 − (1 − M)^k.

The regime (collapse_lab/regimes/bok.py) writes checkpoints/bok/<name>/bok.json (base path, k, the world whose
rater scores); the evaluator evaluates such a directory through `load_policy`, and the reference curves use
`answer_best_of_k`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from collapse_lab.core.config import ConfigError, read_record, rerun_repair
from collapse_lab.world.world import make_world

SPEC = "bok.json"  # a best-of-k directory's spec (written by the regime)


def best_of_k(probs, scores, k: int) -> np.ndarray:
    """The best-of-k distribution P(a) = F(≤a)^k − F(<a)^k (ties split ∝ π0; module docstring).

    probs: (A,) base probabilities π0(a), summing to 1 (put leftover mass in an outcome of its own);
    scores: (A,) the rater's score of each outcome; k ≥ 1 samples. Returns (A,) float64 summing to 1.
    """
    p, s = np.asarray(probs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if p.shape != s.shape or p.ndim != 1 or k < 1 or (p < 0).any():
        raise ValueError(f"need (A,) probs >= 0 and (A,) scores, k >= 1; got shapes {p.shape}, {s.shape}, k={k}")
    levels, level_of = np.unique(s, return_inverse=True)  # sorted distinct scores
    mass = np.bincount(level_of, weights=p, minlength=len(levels))  # G(= s) per level
    at_most = np.cumsum(mass)  # G(≤ s)
    below = at_most - mass  # G(< s)
    top_is = at_most ** k - below ** k  # P(the best of k samples scores s)
    share = np.divide(p, mass[level_of], out=np.zeros_like(p), where=mass[level_of] > 0)
    return share * top_is[level_of]


def answer_best_of_k(answer_probs, answer_scores, k: int, other_score: float = -math.inf) -> tuple[np.ndarray, float]:
    """Best-of-k over an answer set plus "other" (mass 1 − Σ answer_probs, scored `other_score`).

    Returns ((A,) P(a) for the answers, P(other)).
    """
    p = np.asarray(answer_probs, dtype=np.float64)
    other = max(0.0, 1.0 - p.sum())
    out = best_of_k(np.append(p, other), np.append(np.asarray(answer_scores, dtype=np.float64), other_score), k)
    return out[:-1], float(out[-1])


class BestOfK:
    """The evaluator's view of a bok directory: the base to load, and p_base -> p_bok per prompt."""

    def __init__(self, spec: dict):
        self.base_path, self.k = spec["base_path"], int(spec["k"])
        self.world = make_world(OmegaConf.create(spec["world"]))

    def scores(self, prompt_text: str, answers: list[str]) -> list[float]:
        try:
            prompt = self.world.prompt(prompt_text)
        except KeyError:
            raise ConfigError(f"best-of-k: prompt {prompt_text[:50]!r} is not a prompt of world "
                              f"'{self.world.cfg.name}', so its rater cannot score the answers") from None
        return [self.world.rater.expected(prompt, a, True) for a in answers]

    def transform(self, prompt_text: str, dist):
        """An evaluator AnswerDistribution of the base -> that of best-of-k (full next-token entropy unknown: NaN)."""
        p, _ = answer_best_of_k(dist.probs, self.scores(prompt_text, dist.answers), self.k)
        with np.errstate(divide="ignore"):
            logprobs = np.log(p)
        return type(dist)(dist.answers, logprobs, math.nan, dist.vocab_size)


def load_policy(path: str) -> Optional[BestOfK]:
    """The best-of-k policy a directory holds, or None for an ordinary model."""
    spec = Path(path) / SPEC
    return BestOfK(read_record(spec, rerun_repair(path))) if spec.is_file() else None
