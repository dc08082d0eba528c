"""Any two regimes of an ablation compared at matched distance, as the report compares its KL-regularised pairs.

    python benchmarks/matched_pair.py checkpoints/ablations/lm-b0-kl0 kl0 sft-r8 [--x kl gold_gain]

The report compares each KL-regularised regime (β > 0) with each FeedME regime; a pair outside that set (PPO without
the KL penalty against FeedME, two PPO β's, FeedME against its control) is read here with the same function
(report.statistics.matched_pair) and the ablation's own rule (frontier.margin, grid_points, random_prompts from its
ablation.yaml): D = d(A) − d(B), d = Δ(H/log|A|) on the curve suite's prompts, on the seeds both regimes ran, its
interval (seeds and prompts random where the ablation says so), matched range and call. Reads stored results only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_lab.lab.report.statistics import matched_pair, regime_curves  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablation", type=Path, help="an ablation directory (ablation.yaml, runs/)")
    ap.add_argument("a", help="regime A (D = d(A) - d(B))")
    ap.add_argument("b", help="regime B")
    ap.add_argument("--x", nargs="+", default=["kl"], choices=["kl", "gold_gain"], help="what to match on")
    args = ap.parse_args(argv)
    if not (args.ablation / "ablation.yaml").is_file():
        raise SystemExit(f"error: {args.ablation}: not an ablation directory (no ablation.yaml)")
    ran = sorted(p.name for p in (args.ablation / "runs").iterdir() if p.is_dir())
    for name in (args.a, args.b):
        if name not in ran:
            raise SystemExit(f"error: regime {name!r} has no runs in {args.ablation}; valid: {', '.join(ran)}")
    cfg = OmegaConf.load(args.ablation / "ablation.yaml")  # as the report reads it (report/__init__.py)
    rule = OmegaConf.to_container(OmegaConf.select(cfg, "ablate.frontier", default=OmegaConf.create({})), resolve=True)
    confidence = float(OmegaConf.select(cfg, "ablate.collapse.confidence", default=0.95))
    curves = []
    for name in (args.a, args.b):
        seeds = sorted(int(p.name[1:]) for p in (args.ablation / "runs" / name).glob("s*") if p.name[1:].isdigit())
        curves.append(regime_curves(args.ablation, name, seeds))
        if not curves[-1]:
            raise SystemExit(f"error: regime {name!r} in {args.ablation} has no curve points (curve.points = 0?)")
    margin, grid_points = float(rule.get("margin", 0.02)), int(rule.get("grid_points", 8))
    print(f"{args.ablation.name}: D = d({args.a}) - d({args.b}) at matched x, margin {margin:g}, "
          f"{'seeds and prompts random' if rule.get('random_prompts') else 'seeds random'}, {confidence:.0%} intervals")
    for x in args.x:
        r = matched_pair(*curves, f"frontier/{x}", grid_points, confidence, margin, bool(rule.get("random_prompts")))
        d = r["difference"]
        span = "no common range" if r["x_min"] is None else f"[{r['x_min']:.3f}, {r['x_max']:.3f}]"
        est = ("-" if d.get("mean") is None else f"{d['mean']:+.4f}") + ("" if d["lo"] is None else
                                                                       f" [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        pooled = r.get("pooled_difference")
        print(f"  {x}: range {span}, {len(r['seeds'])} seeds, D {est}, call: {r['call']}"
              + (f" (pooled over prompts: {pooled['mean']:+.4f} [{pooled['lo']:+.4f}, {pooled['hi']:+.4f}])"
                 if pooled and pooled["lo"] is not None else ""))


if __name__ == "__main__":
    main()
