"""How often PPO's early steps hit its clip, against where its path runs off π*_β's family, per ablation.

    python benchmarks/clip_binding.py checkpoints/ablations/powered8-b0 checkpoints/ablations/sgd-b0-s12 ...

For each ablation directory (its runs.json and report.json), the primary pair's KL-regularised regime (PPO):
- clipfrac: the share of tokens whose probability ratio left [1 − ε, 1 + ε] in PPO's update (`policy/clipfrac` in
  each run's metrics.jsonl), mean over steps 1..--steps and over seeds (SD across seeds);
- approxkl: PPO's own estimate of how far each step moved the policy on its samples, the same means;
- off: the report's offset off π*_β's family at matched KL (report.closed_forms.predictions[0].off_curve, interval
  across seeds), and its matched range.

A step that reaches the clip changes every sampled answer's probability by the factor 1 ± ε, whatever that
probability (a move in log-probabilities, as the natural gradient's); a step inside it follows the weights' gradient.
Reads stored results only (records.early_updates, as the report does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_lab.lab.report.records import early_updates  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablations", nargs="+", help="ablation directories (runs.json, report.json)")
    ap.add_argument("--steps", type=int, default=10, help="the first steps to average over")
    args = ap.parse_args(argv)
    print(f"{'ablation':<22} {'regime':<7} {'seeds':>5} {'clipfrac':>15} {'approxkl':>8}  off pi*_beta's family [95%]"
          f"  (KL range)")
    for d in map(Path, args.ablations):
        report = json.loads((d / "report.json").read_text())
        pred = report["closed_forms"]["predictions"][0]
        regime = pred["regime"]
        runs = [r for r in json.loads((d / "runs.json").read_text())["runs"] if r["regime"] == regime]
        per_seed = [early_updates(Path(r["path"]), args.steps) for r in runs]  # what the report reads
        if not all(per_seed):
            raise SystemExit(f"{d}: a {regime} run logged no policy/clipfrac (not the lab's PPO?)")
        clip = np.array([m["clipfrac"] for m in per_seed])
        akl = np.mean([m["approxkl"] for m in per_seed])
        off = pred["off_curve"][regime]
        comp = next(c for c in report["frontier"]["comparisons"] if c["regime"] == regime and c["x"] == "kl")
        print(f"{d.name:<22} {regime:<7} {len(runs):>5} {clip.mean():>7.3f} ± {clip.std(ddof=1):.3f} {akl:>8.4f}  "
              f"{off['mean']:+.4f} [{off['lo']:+.4f}, {off['hi']:+.4f}]  ([{comp['x_min']:.3f}, {comp['x_max']:.3f}])")


if __name__ == "__main__":
    main()
