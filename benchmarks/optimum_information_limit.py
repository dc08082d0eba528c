"""How close to π* can N noisy ratings get ANY learner that estimates each answer's mean score?

    python benchmarks/optimum_information_limit.py [overrides ...] [--ratings 19200,64000] [--repeats 5]

PPO with `reward=gold` learns π*(a) ∝ π0(a)^κ·e^{R(a)/τ} (collapse_lab/evaluation/optimum.py) from the gold rater's
NOISY ratings, so its distance to π* after N ratings has a floor that no optimiser removes. This script
measures that floor for a simple, well-informed learner, on the seed prompts of the configured world and
base (the overrides are the lab's: `ppo.kl_coef=0.2`, `ppo.ent_coef=0.02`, `world.rater.*`, `base_path=`):

    1. draw N answers, N / |prompts| per seed prompt, from π* itself (the best case for coverage: PPO's
       own samples come from its policy), and rate each with the world's rater (`GoldRater.__call__`:
       its noise, clipping and rounding), ended with EOS
    2. estimate each answer's mean score R̂(a) = (Σ ratings + m)/(n(a) + 1): its ratings' mean shrunk by one
       pseudo-rating at the prompt's mean rating m
         per prompt: from that prompt's ratings only
         pooled:     from every seed prompt where the rater gives that answer the same mean score (an oracle
                     for what a network sharing features across prompts could at best share)
    3. π̂ = answer_optimum(π0, R̂) and its TV to π* (the clean scores estimated, the rest exact)

Printed: TV mean / max over the prompts, mean over `--repeats` draws. A learner reading the same number of
ratings is not expected to beat the pooled column by much unless it knows more about R than the ratings
say (e.g. that all non-favourite answers score alike).
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import numpy as np

from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
from collapse_lab.core.config import compose
from collapse_lab.evaluation.frontier import Curve
from collapse_lab.models.models import load_pretrained
from collapse_lab.evaluation.optimum import answer_optimum, optimum_tv
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.world.world import make_world


def draw(curve: Curve, targets: list[np.ndarray], per_prompt: int, rng: random.Random):
    """Per prompt: (counts, sums) of ratings per answer, N answers drawn from π* and rated by the world's rater."""
    out = []
    for p, target in zip(curve.prompts, targets):
        prompt = curve.world.prompt(p.text)
        idx = np.random.default_rng(rng.getrandbits(32)).choice(len(target), size=per_prompt, p=target)
        counts, sums = np.zeros(len(target)), np.zeros(len(target))
        for i in idx:
            counts[i] += 1
            sums[i] += curve.world.rater(prompt, p.answers[i], rng, True)
        out.append((counts, sums))
    return out


def estimate_tvs(curve: Curve, targets, ratings, beta: float, alpha: float, pooled: bool) -> list[float]:
    if pooled:
        total_n, total_s = defaultdict(float), defaultdict(float)
        keys = [[(a, curve.world.rater.mean_score(curve.world.prompt(p.text), a, True)) for a in p.answers]
                for p in curve.prompts]
        for ks, (n, s) in zip(keys, ratings):
            for k, ni, si in zip(ks, n, s):
                total_n[k] += ni
                total_s[k] += si
        ratings = [(np.array([total_n[k] for k in ks]), np.array([total_s[k] for k in ks])) for ks in keys]
    tvs = []
    for base, (clean, unclean), target, (n, s) in zip(curve.base, curve.scores, targets, ratings):
        prior = s.sum() / max(n.sum(), 1)
        estimate = (s + prior) / (n + 1)
        tvs.append(optimum_tv(answer_optimum(base, estimate, unclean, beta, alpha), target))
    return tvs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", default="19200,32000,64000", help="comma-separated rating counts N")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose("lab", args.overrides)
    beta, alpha = float(cfg.ppo.kl_coef), float(cfg.ppo.ent_coef)
    base_path = resolve_base(cfg)
    model, tokenizer = load_pretrained(str(base_path), "float32")
    model.eval()
    curve = Curve(model, tokenizer, make_world(cfg.world))
    targets = [answer_optimum(b, *s, beta, alpha) for b, s in zip(curve.base, curve.scores)]
    print(f"base {base_path}, β = {beta:g}, α = {alpha:g}, favourites {list(cfg.world.rater.favourites)}, "
          f"preference {cfg.world.rater.preference_strength:g}, {len(curve.prompts)} seed prompts, "
          f"{args.repeats} draws each; the base's own TV to π*: mean %.3f / max %.3f"
          % (np.mean(base_tv := [optimum_tv(b.probs, t) for b, t in zip(curve.base, targets)]), np.max(base_tv)))
    print("| ratings N | per prompt: TV mean / max | pooled: TV mean / max |")
    print("|---|---|---|")
    rng = random.Random(0)
    for n in (int(x) for x in args.ratings.split(",")):
        cells = {True: [], False: []}
        for _ in range(args.repeats):
            ratings = draw(curve, targets, n // len(curve.prompts), rng)
            for pooled in cells:
                tvs = estimate_tvs(curve, targets, ratings, beta, alpha, pooled)
                cells[pooled].append((np.mean(tvs), np.max(tvs)))
        fmt = lambda c: "%.3f / %.3f" % tuple(np.mean(c, axis=0))  # noqa: E731
        print(f"| {n} | {fmt(cells[False])} | {fmt(cells[True])} |")


if __name__ == "__main__":
    main()
