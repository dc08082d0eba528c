"""The closed-form reference curves on the human prior (what a base that learnt the world exactly would hold), for
the two-level and the graded rater: the largest |Δd| at matched KL between best-of-k, FeedME's expected selection
and π*_β within 2 nats, and a few points of each family (docs/world.md quotes this script's output).

    python benchmarks/reference_separation.py
"""

import numpy as np
from omegaconf import OmegaConf

from collapse_lab.evaluation import reference_curves as rc
from collapse_lab.core.config import RaterConfig
from collapse_lab.world.world import HUMAN_FAVOURITES, GoldRater, Prompt, answer_prior

RANGES = ((0, 100), (1, 100))  # the seed prompts' ranges (two at 0-100, three at 1-100; each range once here)


def forms(rater_cfg):
    rater = GoldRater(OmegaConf.structured(rater_cfg))
    out = []
    for lo, hi in RANGES:
        prompt, answers = Prompt("t", "numbers", "t", lo, hi), [f" {n}" for n in range(lo, hi + 1)]
        p = np.array(answer_prior("human", lo, hi))
        mu = [[rater.expected(prompt, a, e) for a in answers] for e in (True, False)]
        mean = [[rater.mean_score(prompt, a, e) for a in answers] for e in (True, False)]
        out.append(rc.prompt_forms(f"{lo}-{hi}", p, 0 * p, *mu, *mean, rater_cfg.noise_std))
    return out, rater


def main():
    print("rater | favourites | levels of E[r] on 0-100 | best-of-k vs π*_β | FeedME(k=4) vs π*_β | FeedME vs best-of-k "
          "(largest |Δd| at matched KL ≤ 2 nats, at KL)")
    cases = [("two_level [7,42,97]", RaterConfig(profile="two_level", favourites=[7, 42, 97], preference_strength=1.0))]
    cases += [(f"graded profile_seed={s}", RaterConfig(profile_seed=s)) for s in range(4)]
    for name, cfg in cases:
        fs, rater = forms(cfg)
        fam = rc.reference_families(fs, 4, kl_max=2.0)
        prompt = Prompt("t", "numbers", "t", 0, 100)
        levels = len({round(rater.mean_score(prompt, f" {n}"), 9) for n in range(101)})
        on_modes = sorted(set(rater.favourites) & set(HUMAN_FAVOURITES))
        seps = [rc.separation(fam[a], fam[b], 2.0) for a, b in
                (("best_of_k", "optimum_beta"), ("feedme", "optimum_beta"), ("feedme", "best_of_k"))]
        print(f"{name} | {sorted(rater.favourites)} (on the prior's modes: {on_modes}) | {levels} | "
              + " | ".join(f"{s['value']:.4f} @ {s['at_kl']:.2f}" for s in seps))
    fs, _ = forms(RaterConfig())
    print("\ndefault graded rater: KL, d = Δ(H/log|A|), gold gain")
    for b in (2, 1, 0.5, 0.3, 0.2, 0.15, 0.13, 0.1):
        x = rc.point(fs, lambda f: rc.optimum(f.p0, f.mean, b))
        print(f"π*_β β={b:<5} KL {x['kl']:.3f}  d {x['d']:+.4f}  gain {x['gold_gain']:+.3f}")
    for k, r in ((4, 1), (4, 3), (16, 1), (16, 3), (16, 8)):
        x = rc.point(fs, lambda f: rc.feedme_selection(f.p0, f.level_probs, k, r))
        print(f"FeedME k={k:<3} rounds={r}  KL {x['kl']:.3f}  d {x['d']:+.4f}  gain {x['gold_gain']:+.3f}")
    for k in (4, 16, 64):
        x = rc.point(fs, lambda f: rc.best_of_k(f.p0, f.mu, k))
        print(f"best-of-{k:<3}            KL {x['kl']:.3f}  d {x['d']:+.4f}  gain {x['gold_gain']:+.3f}")


if __name__ == "__main__":
    main()
