"""Where a PPO run's remaining distance to π* sits, and whether it is noise or a systematic bias.

    python benchmarks/optimum_residual.py checkpoints/ppo/<run> [checkpoints/ppo/<run> ...]

Runs of one world and base (seeds, learning rates, ...), reward=gold. For each run and seed prompt, the
exact answer distribution π and the closed-form π* of the run's own objective (collapse_lab/evaluation/optimum.py),
both normalised over the valid answers; then

- TV(π, π*) split into the favourites' part and the other answers' part (the two sum to the TV);
- per answer group (`collapse_lab.evaluation.optimum.answer_groups`: favourites, their extensions, answers sharing a
  favourite's first or last token, the rest), log(π(G)/π*(G)): the log of the group's mass over π*'s
  (0: right; mean over the prompts);
- per prompt, the answers furthest from π* (|π − π*|, with π, π* and the base's π0): which answers hold
  the distance (e.g. one answer behind a shared first token, or a long tail of small ones);
- across runs, the correlation of each answer's log(π/π*) averaged over the prompts (non-favourites,
  each run's mean removed), and that average's standard deviation (nats). The rating noise of two runs
  with different seeds is independent: a correlation near 0 says the residual is noise, a high one
  that it is a bias the runs share.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from collapse_lab.core.checkpoint import read_manifest
from collapse_lab.evaluation.evaluator import answer_distribution
from collapse_lab.evaluation.frontier import Curve
from collapse_lab.models.models import load_pretrained
from collapse_lab.evaluation.optimum import ANSWER_GROUPS as GROUPS, answer_groups, answer_optimum
from collapse_lab.world.world import make_world


TOP = 4  # answers listed per prompt


def residual(run: Path, curve: Curve, tokenizer) -> dict:
    cfg = OmegaConf.load(run / "config.yaml")
    model, _ = load_pretrained(str(run))
    favourites = {int(f) for f in cfg.world.rater.favourites}
    tv, parts, masses, log_ratio, worst = [], [], {g: [] for g in GROUPS}, {}, {}
    for p, base, scores in zip(curve.prompts, curve.base, curve.scores):
        pi = answer_distribution(model, tokenizer, p.text, p.answers, p.continue_chars).normalised
        opt = answer_optimum(base, *scores, float(cfg.ppo.kl_coef), float(cfg.ppo.ent_coef))
        groups = np.array(answer_groups(p.answers, favourites, tokenizer))
        gap = 0.5 * np.abs(pi - opt)
        tv.append(gap.sum())
        base_pi = base.normalised
        worst[p.id] = [(p.answers[i], pi[i], opt[i], base_pi[i]) for i in np.argsort(-gap)[:TOP]]
        parts.append((gap[groups == "favourites"].sum(), gap[groups != "favourites"].sum()))
        for g in GROUPS:
            if (groups == g).any():
                masses[g].append(np.log(pi[groups == g].sum() / opt[groups == g].sum()))
        for a, x, y, g in zip(p.answers, pi, opt, groups):
            if g != "favourites":
                log_ratio.setdefault(a, []).append(np.log(x / y))
    per_answer = {a: np.mean(v) for a, v in log_ratio.items() if len(v) == len(curve.prompts)}
    centre = np.mean(list(per_answer.values()))
    return {"tv": np.mean(tv), "tv_max": max(tv), "parts": np.mean(parts, 0),
            "groups": {g: np.mean(v) if v else float("nan") for g, v in masses.items()},
            "log_ratio": {a: x - centre for a, x in per_answer.items()}, "worst": worst}


def main(runs: list[Path]) -> None:
    first = OmegaConf.load(runs[0] / "config.yaml")
    base = read_manifest(runs[0])["base_path"]
    reference, tokenizer = load_pretrained(base)
    curve = Curve(reference, tokenizer, make_world(first.world))
    results = [residual(r, curve, tokenizer) for r in runs]
    print("| run | TV mean / max | favourites' part / the rest's | " + " | ".join(GROUPS) + " | std of log(π/π*), nats |")
    print("|---|---|---|" + "---|" * len(GROUPS) + "---|")
    for run, r in zip(runs, results):
        print(f"| {run.name} | {r['tv']:.3f} / {r['tv_max']:.3f} | {r['parts'][0]:.3f} / {r['parts'][1]:.3f} | "
              + " | ".join(f"{r['groups'][g]:+.2f}" for g in GROUPS) + f" | {np.std(list(r['log_ratio'].values())):.2f} |")
    print("\ngroups: log(π(G)/π*(G)), mean over the seed prompts; the last column: over the non-favourite answers,")
    print("each answer's log(π/π*) averaged over the prompts")
    for run, r in zip(runs, results):
        print(f"\n{run.name}: the {TOP} answers furthest from π* on each prompt (π / π* / base π0)")
        for pid, rows in r["worst"].items():
            print(f"  {pid:>16s}  " + "; ".join(f"{a!r} {x:.3f} / {y:.3f} / {b:.3f}" for a, x, y, b in rows))
    if len(results) > 1:
        common = sorted(set.intersection(*(set(r["log_ratio"]) for r in results)))
        vectors = [[r["log_ratio"][a] for a in common] for r in results]
        print(f"\ncorrelation of the per-answer log(π/π*) across runs ({len(common)} non-favourite answers):")
        for run, row in zip(runs, np.corrcoef(vectors)):
            print(f"  {run.name:>24s}  " + " ".join(f"{c:+.2f}" for c in row))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/optimum_residual.py checkpoints/ppo/<run> [...]")
    runs = [Path(a) for a in sys.argv[1:]]
    for run in runs:
        manifest = read_manifest(run) if (run / "config.yaml").is_file() else None
        if not manifest or manifest.get("stage") != "ppo" or manifest.get("status") != "finished":
            sys.exit(f"error: {run} is not a finished PPO run (a checkpoints/ppo/<run> directory with its "
                     f"config.yaml and a finished manifest)")
        cfg = OmegaConf.load(run / "config.yaml")
        if cfg.reward != "gold":
            sys.exit(f"error: {run} was trained with reward=rm; π* is the gold rater's objective: give reward=gold runs")
        first = OmegaConf.load(runs[0] / "config.yaml")
        if manifest["base_path"] != read_manifest(runs[0])["base_path"] or cfg.world.name != first.world.name \
                or list(cfg.world.rater.favourites) != list(first.world.rater.favourites):
            sys.exit(f"error: {run} and {runs[0]} differ in base, world or favourites; compare runs of one world and base")
    main(runs)
