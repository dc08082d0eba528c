"""Where a KL-regularised regime's path lies against three optimiser geometries on the same objective, per report.

    python benchmarks/gradient_paths.py docs/example-powered/base0/report.json docs/results/bases8/reports/base*.json.gz

For each report (its base's exact answer distributions and gold scores on the curve prompts, stored in
frontier.references.base) and its primary pair's matched grid, the offset off π*_β's family at matched KL
(mean over the grid of d − d_family, normalised-entropy units) of:

- the MEASURED regime (the report's off_curve, interval across seeds),
- the exact NATURAL-gradient path (rc.gradient_path natural=True: the family itself, so ~0: a check),
- the exact VANILLA softmax policy-gradient path (rc.gradient_path, what the report prints),
- ADAM on the exact vanilla gradient of a one-logit-per-answer policy (β1 0.9, β2 0.999, at two learning rates):
  Adam rescales each logit's step by its own gradient's RMS, so unlikely answers move about as fast as likely
  ones. Exploratory, not in the report: its path depends on the learning rate, and a network's Adam acts on
  weights shared by every answer, not on one logit per answer.
- an idealised CLIP-BOUND step (every outcome's log-probability ± eps by the sign of its advantage, as a ratio
  driven to PPO's clip; optionally weighted by the chance 1 − (1 − q)^8 that 8 samples drew it). Exploratory too.

A path that does not reach the whole grid is averaged over the grid points it reaches (the count is printed).
Numpy only, one core.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_lab.evaluation import reference_curves as rc  # noqa: E402


def tabular_path(forms, delta, steps: int, record_every: float = 0.01, kl_max: float = math.inf) -> list[dict]:
    """One logit per outcome from the base, every prompt on one clock: θ_i += delta(step, i, q_i, log π0_i) on the
    outcomes the base produces; read at first passage of each KL, as rc.gradient_path is; ends after `steps` steps
    or past kl_max."""
    lp0 = [np.log(np.where(f.p0 > 0, f.p0, 1.0)) for f in forms]
    live = [f.p0 > 0 for f in forms]
    theta, out = [x.copy() for x in lp0], []
    for step in range(1, steps + 1):
        qs = [rc.masked_softmax(th, on) for th, on in zip(theta, live)]
        now = rc.point(forms, lambda f, by={f.id: q for f, q in zip(forms, qs)}: by[f.id])
        if not out or math.sqrt(max(now["kl"], 0)) - math.sqrt(max(out[-1]["kl"], 0)) >= record_every:
            out.append(now)
        if now["kl"] > kl_max:
            break
        theta = [th + np.where(on, delta(step, i, q, lp0[i]), 0.0)
                 for i, (th, on, q) in enumerate(zip(theta, live, qs))]
    return out


def adam_path(forms, beta: float, lr: float, steps: int = 6000) -> list[dict]:
    """Adam (bias-corrected, β1 0.9, β2 0.999, ε 1e-8) ascending J on one logit per outcome."""
    m, v = [0.0] * len(forms), [0.0] * len(forms)

    def delta(step, i, q, lp0):
        g = rc.policy_gradient(q, lp0, forms[i].mean, beta)
        m[i] = 0.9 * m[i] + 0.1 * g
        v[i] = 0.999 * v[i] + 0.001 * g * g
        return lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)

    return tabular_path(forms, delta, steps)


def clip_bound_path(forms, beta: float, samples: float = math.inf, eps: float = 0.002, steps: int = 40000,
                    kl_max: float = 6.0) -> list[dict]:
    """An idealised clip-BOUND PPO step on one logit per outcome: every outcome whose advantage a − E_q[a] is positive
    gains eps in log-probability, every other one loses eps (a ratio driven to the clip, 1 ± eps, whatever its
    probability), each weighted by the chance it was sampled at all, 1 − (1 − q)^samples (samples = inf: every
    outcome moves)."""
    def delta(step, i, q, lp0):
        seen = 1.0 if math.isinf(samples) else 1.0 - (1.0 - q) ** samples
        return eps * np.sign(rc.policy_gradient(q, lp0, forms[i].mean, beta, natural=True)) * seen

    return tabular_path(forms, delta, steps, kl_max=kl_max)


def off(path: list[dict], family: list[dict], grid) -> tuple[float, int]:
    """(mean over the grid points the path reaches of d_path − d_family, how many it reaches)."""
    diff = rc.d_at(path, grid) - rc.d_at(family, grid)
    ok = ~np.isnan(diff)
    return (float(diff[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--lrs", default="0.003,0.01", help="Adam learning rates, comma-separated")
    args = ap.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    print("report | regime (beta) | grid (nats) | measured off [95%] | natural | vanilla | "
          + " | ".join(f"Adam lr {lr:g}" for lr in lrs) + " | clip-bound | clip-bound, 8 samples")
    for path in args.reports:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            rep = json.load(fh)
        forms = rc.forms_from_json(rep["frontier"]["references"]["base"])
        pred = next(p for p in rep["closed_forms"]["predictions"] if p["x"] == "kl" and p.get("off_curve"))
        comp = next(c for c in rep["frontier"]["comparisons"]
                    if c["regime"] == pred["regime"] and c["feedme"] == pred["feedme"] and c["x"] == "kl")
        beta = rep["regimes"][pred["regime"]]["kl_coef"]
        grid = np.asarray(comp["grid"])
        family = rc.optimum_curve(forms, kl_max=2 * grid.max())
        measured = pred["off_curve"][pred["regime"]]
        cells = [off(rc.gradient_path(forms, beta, natural=True, kl_max=2 * grid.max()), family, grid),
                 off(rc.gradient_path(forms, beta, kl_max=2 * grid.max()), family, grid)]
        cells += [off(adam_path(forms, beta, lr), family, grid) for lr in lrs]
        cells += [off(clip_bound_path(forms, beta, n, kl_max=2 * grid.max()), family, grid) for n in (math.inf, 8)]
        print(f"{path} | {pred['regime']} ({beta:g}) | [{grid.min():.3f}, {grid.max():.3f}] | "
              f"{measured['mean']:+.4f} [{measured['lo']:+.4f}, {measured['hi']:+.4f}] | "
              + " | ".join(f"{o:+.4f} ({n}/{len(grid)})" for o, n in cells), flush=True)


if __name__ == "__main__":
    main()
