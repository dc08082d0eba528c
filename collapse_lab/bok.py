"""Best-of-k as a regime (`recipe=bok`): no training; the policy is "sample k from the base, keep
the one the rater scores highest". Its exact answer distribution is a closed form of the base's.

    P(a) = F(≤a)^k − F(<a)^k        F(≤a) = base mass on answers rated no better than a

Ties (answers with the same score) are split in proportion to the base's mass: the kept sample is
a uniformly random one among the tied best samples (equivalently the first of them, the samples being
i.i.d.), so with S(a) the answers scored like a and G the base's score distribution,

    P(a) = π0(a) / π0(S(a)) · [G(≤s(a))^k − G(<s(a))^k]

which is the formula above whenever a has no tie. FeedME with top-1 of k (collapse_lab/sft.py) is the
distillation of this policy: on the one-token bandit it must reproduce it (tests/test_sft.py).

Scores are the rater's EXPECTED (noiseless) score, `world.rater.expected`; on world=bandit the rater is
noiseless anyway. On an answer suite (the seed prompts) the answers are the suite's answer set A plus
one "other" outcome holding the base's remaining mass 1 − M (invalid or non-ending completions). The
gold rater scores every completion outside A strictly below every answer in A (an in-range number that
ends cleanly gets ≥ 6, anything else ≤ 5), so "other" is scored below all answers and the result is exact
for A whatever "other" holds: best-of-k's valid mass is 1 − (1 − M)^k.

`make_bok(cfg)` writes checkpoints/bok/<name>/bok.json (base path, k, the world whose rater scores);
the evaluator (collapse_lab/evaluator.py) evaluates such a directory through `load_policy`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from collapse_lab.checkpoint import publish
from collapse_lab.config import ConfigError, read_record, rerun_repair, run_dir
from collapse_lab.pretrain import resolve_base
from collapse_lab.stage import run_stage
from collapse_lab.world import make_world

STAGE = "bok"
SPEC = "bok.json"


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


# ---------------------------------------------------------------------------- the regime


def stage_keys(cfg: DictConfig) -> tuple[str, ...]:
    """What a best-of-k policy depends on: the base, the world (its rater), k."""
    keys = ("base_path", "model", "world", "ratings.samples_per_prompt")
    return keys + (("pretrain",) if not cfg.base_path and not cfg.model.path else ())


def bok_dir(cfg: DictConfig, named: bool = True) -> Path:
    return run_dir(cfg, STAGE, stage_keys(cfg), f"{cfg.model.name}-{cfg.world.name}-bo{cfg.ratings.samples_per_prompt}",
                   named)


def make_bok(cfg: DictConfig, named: bool = True) -> Path:
    """Write (or find) the best-of-k spec: k = ratings.samples_per_prompt, the same k FeedME keeps the best of.

    The budget: no ratings in training (samples_scored 0), k ratings per query at inference
    (`ratings_per_query`), which collapse_lab.budget reports as not comparable with trained regimes.
    """
    k = cfg.ratings.samples_per_prompt
    if k < 1:
        raise ConfigError(f"need ratings.samples_per_prompt >= 1 (the k of best-of-k), got {k}")
    out = bok_dir(cfg, named)
    with run_stage(cfg, out, STAGE, "best of {k}", track=False) as run:
        if run.done:
            return out
        base = resolve_base(cfg)
        run.start(base_path=base, k=k)
        spec = {"policy": "best_of_k", "base_path": base, "k": k, "scores": "rater.expected",
                "ties": "split in proportion to the base's mass", "world": OmegaConf.to_container(cfg.world, resolve=True)}
        publish(out, lambda tmp: (tmp / SPEC).write_text(json.dumps(spec, indent=1) + "\n"))
        run.finish(samples_scored=0, ratings_per_query=k, steps=0, tokens_trained=0)
        print(f"saved {out} (best of {k} of {base})")
    return out


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
