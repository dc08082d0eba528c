"""What the closed forms predict for the powered pair on OTHER bases: the lab's tiny bases and real pretrained LMs.

    python benchmarks/closed_forms_bases.py checkpoints/base/tiny-s0-... gemma3-270m smollm2-135m-instruct human^3 lm^1 \
        [--profiles 0 1 2 3] [--noise 0.5] [--range 0.1 2.5]

The report's predicted call (closed_forms.predictions) reads ONE base: the ablation's. Whether "no difference at
matched KL" is a property of the world's rater or of that base's prior is a question about other bases, and the
closed forms need no training to answer it: only the base's exact answer distributions on the powered design's
held-out prompts (frontier.Curve, the evaluator's tree attention) and the rater's scores. Per base (a pretrained
base's directory, or a model preset's name: `gemma3-270m` is Gemma 3 270M's pretrained base, from PyPI;
`smollm2-135m-instruct` is an instruction-tuned model, SFT + DPO, so a prior already moved by preference training)
or `PRIOR^A`: no model, a world answer prior (`human`, `lm`; world.answer_prior) raised to the power A and
renormalised on each prompt's range, A = 1 what a tiny base that learnt that world exactly would hold, larger A a
more peaked prior)
and per graded-rater profile (`world.rater.profile_seed`: another preference table, other favourites) and rating
noise (`world.rater.noise_std`, the standard deviation of the rater's noise before rounding to 1..7; FeedME selects
on one noisy rating, π*_β tilts by the expected one):

- the base's H/log|A| and valid mass on the prompts (mean over prompts), and ρ: Spearman's rank correlation of the
  base's log-probability of each answer with the rater's expected score for it (mean over prompts; the graded
  rater is built partly against the WORLD's prior, so a tiny base's ρ is negative);
- the largest |Δd| at matched KL within 3 nats between best-of-k and π*_β, and between FeedME's expected selection
  (top-1 of 16 on noisy ratings, iterated rounds: sft-r8's family) and π*_β (reference_curves.separation);
- the powered pair's predicted D = d(π*_β) − d(FeedME k=16) at matched KL, the mean over a √KL-spaced grid of 8
  points on --range (nats; the same range for every base, so bases are compared on one range), its call at the
  margin 0.02, and D at 0.5, 1 and 2 nats; D again on the base renormalised over the answers (its mass outside
  the answer set, which a real LM's prompts leave large, removed); and D against best-of-k instead of FeedME on the
  same grid (noiseless ranking: the limit FeedME's noisy selection approaches as the rating noise shrinks).

The world is the powered preset's (recipes/preset/powered.yaml: held-out templates, the curve suite `heldout`).
No sampling: every number is exact given the base's float32 forward passes (which differ in the last bits across
CPUs). A real model needs the optional extra (bash scripts/setup.sh --real).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_lab.core.config import compose  # noqa: E402
from collapse_lab.evaluation import reference_curves as rc  # noqa: E402
from collapse_lab.core.suites import load_suite  # noqa: E402
from collapse_lab.evaluation.frontier import Curve, _Dist  # noqa: E402
from collapse_lab.evaluation.matched import grid_between  # noqa: E402
from collapse_lab.evaluation.optimum import answer_scores  # noqa: E402
from collapse_lab.lab.ablate import preset_overrides  # noqa: E402
from collapse_lab.models.models import load_pretrained  # noqa: E402
from collapse_lab.world.world import ANSWER_PRIORS, answer_prior, make_world  # noqa: E402

MARGIN, FEEDME_K, KL_TESTED = 0.02, 16, 3.0


def world_of(profile: int, noise: float | None = None):
    """The powered preset's world with the graded rater's profile_seed = profile (and noise_std = noise, if given)."""
    preset = compose("ablate", ["preset=powered"])
    lab = compose("lab", [*preset_overrides(OmegaConf.to_container(preset.lab, resolve=True)),
                          f"world.rater.profile_seed={profile}",
                          *([] if noise is None else [f"world.rater.noise_std={noise}"])])
    return make_world(lab.world)


def rescored(curve: Curve, world) -> Curve:
    """The same base distributions scored by another world's rater (the base's forward passes are not repeated)."""
    out = copy.copy(curve)
    out.world = world
    out.scores = [answer_scores(world.rater, world.prompt(p.text), p.answers) for p in curve.prompts]
    return out


def prior_curve(world, power: float, prior: str = "human") -> Curve:
    """A Curve without a model: on each held-out prompt the world answer prior `prior` on its range, raised to
    `power` and renormalised, every answer ended cleanly (valid mass 1)."""
    curve = object.__new__(Curve)
    curve.world = world
    curve.prompts = [p for p in load_suite("heldout").prompts if p.answers is not None and p.text in world.by_text]
    curve.base = []
    for p in curve.prompts:
        q = world.prompt(p.text)
        w = np.asarray(answer_prior(prior, q.low, q.high)) ** power
        assert len(w) == len(p.answers), p.id  # the answers are the range's numbers, in order
        curve.base.append(_Dist(w / w.sum(), 0 * w))
    curve.scores = [answer_scores(world.rater, world.prompt(p.text), p.answers) for p in curve.prompts]
    return curve


def answers_only(forms_json: dict) -> dict:
    """The same closed-form inputs with each prompt's answer mass renormalised to 1 (no mass outside the set)."""
    out = copy.deepcopy(forms_json)
    for p in out["prompts"]:
        total = sum(p["eos_probs"]) + sum(p["other_end_probs"])
        p["eos_probs"] = [x / total for x in p["eos_probs"]]
        p["other_end_probs"] = [x / total for x in p["other_end_probs"]]
    return out


def row(forms, lo: float, hi: float) -> dict:
    """Separations within KL_TESTED and the pair's predicted D on a √KL-spaced grid of 8 points on [lo, hi], cut
    to where both families reach (a peaked prior's π*_β stops short: its β → 0 limit is π0's top answer, at KL
    −log π0(top)); `hi` the range's end used."""
    top = max(KL_TESTED, hi) + 0.5
    fam = {"best_of_k": rc.best_of_k_curve(forms, kl_max=top), "feedme": rc.feedme_curve(forms, FEEDME_K, kl_max=top),
           "optimum_beta": rc.optimum_curve(forms, kl_max=top)}
    sep = {a: rc.separation(fam[a], fam["optimum_beta"], KL_TESTED) for a in ("best_of_k", "feedme")}
    hi = min(hi, *(max(x["kl"] for x in fam[f]) for f in ("optimum_beta", "feedme")))
    d = rc.predicted_difference(fam["optimum_beta"], fam["feedme"], grid_between(lo, hi, 8, True)) if hi > lo else None
    at = {x: (float(rc.d_at(fam["optimum_beta"], [x])[0] - rc.d_at(fam["feedme"], [x])[0]) if x <= hi else None)
          for x in (0.5, 1.0, 2.0)}
    hi_bok = min(hi, max(x["kl"] for x in fam["best_of_k"]))
    d_bok = (rc.predicted_difference(fam["optimum_beta"], fam["best_of_k"], grid_between(lo, hi_bok, 8, True))
             if hi_bok > lo else None)
    return {"sep": sep, "d": d, "call": rc.predicted_call(d, MARGIN), "at": at, "hi": hi, "d_bok": d_bok}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bases", nargs="+", help="a pretrained base's directory, or a model preset's name")
    ap.add_argument("--profiles", type=int, nargs="+", default=[0, 1, 2, 3], help="graded-rater profile seeds")
    ap.add_argument("--noise", type=float, nargs="+", default=[None],
                    help="the rater's noise standard deviations (default: the powered world's)")
    ap.add_argument("--range", type=float, nargs=2, default=[0.1, 2.5], metavar=("LO", "HI"),
                    help="the KL range (nats) the predicted D is averaged over")
    args = ap.parse_args(argv)
    if not 0 <= args.range[0] < args.range[1]:
        raise SystemExit(f"error: --range {args.range}: expected LO HI in nats with 0 <= LO < HI")
    if any(n is not None and n < 0 for n in args.noise):
        raise SystemExit(f"error: --noise {args.noise}: expected standard deviations >= 0")
    torch.set_num_threads(1)
    worlds = {(s, n): world_of(s, n) for s in args.profiles for n in args.noise}
    print(f"predicted D = d(pi*_beta) - d(FeedME top-1 of {FEEDME_K}, iterated) at matched KL, mean over 8 "
          f"sqrt-spaced points on [{args.range[0]:g}, {args.range[1]:g}] nats (or to where both families end); separations within {KL_TESTED:g} nats; "
          f"call at margin {MARGIN:g}")
    print("base | profile (favourites) | noise | prompts | base H/log|A| | valid mass | rho | best-of-k vs pi* (at KL) | "
          "FeedME vs pi* (at KL) | predicted D (range's end) | call | D at 0.5 / 1 / 2 nats | D, answers only")
    for spec in args.bases:
        t0 = time.time()
        if "^" in spec and spec.split("^", 1)[0] in ANSWER_PRIORS:
            prior, power = spec.split("^", 1)
            curve = prior_curve(next(iter(worlds.values())), float(power), prior)
        else:
            model, tok = load_pretrained(spec if Path(spec).is_dir() else f"real:{spec}")
            model.eval()
            curve = Curve(model, tok, next(iter(worlds.values())), suite="heldout")
        if not curve:
            raise SystemExit(f"error: {spec}: the world knows none of the held-out suite's prompts")
        name = Path(spec).name if Path(spec).is_dir() else spec
        for (s, _), world in worlds.items():
            scored = rescored(curve, world)
            forms_json = scored.base_forms()
            forms = rc.forms_from_json(forms_json)
            h = np.mean([-(b.normalised * np.log(np.maximum(b.normalised, 1e-300))).sum() / np.log(len(p.answers))
                         for b, p in zip(curve.base, curve.prompts)])
            valid = np.mean([b.probs.sum() for b in curve.base])
            r = row(forms, *args.range)
            r_answers = row(rc.forms_from_json(answers_only(forms_json)), *args.range)
            rho = np.mean([stats.spearmanr(np.log(np.maximum(b.normalised, 1e-300)), clean).statistic
                           for b, (clean, _) in zip(curve.base, scored.scores)])
            favs = sorted(world.rater.favourites)
            print(f"{name} | {s} {favs} | {world.rater.cfg.noise_std:g} | {len(forms)} | {h:.3f} | {valid:.3f} | {rho:+.2f} | "
                  + " | ".join(f"{r['sep'][a]['value']:.4f} ({r['sep'][a]['at_kl']:.2f})" for a in ("best_of_k", "feedme"))
                  + f" | {'-' if r['d'] is None else format(r['d'], '+.4f')} ({r['hi']:.2f}) | {r['call']} | "
                  + " / ".join("-" if v is None else f"{v:+.4f}" for v in r["at"].values())
                  + f" | {'-' if r_answers['d'] is None else format(r_answers['d'], '+.4f')}"
                  + f" | {'-' if r['d_bok'] is None else format(r['d_bok'], '+.4f')}", flush=True)
        print(f"  ({name}: {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
