"""Onto what does each regime collapse? Per seed, the answers its end point puts on top, from an ablation's evals.

    python benchmarks/top_answers.py checkpoints/ablations/lm-b0-kl0 [--suite heldout] [--against sft-r8]

For each regime and seed of the ablation (evals/<regime>/s<seed>/<suite>.json, the exact evaluator's output):
how many of the suite's prompts have each answer as their most probable one (the two commonest), the mean top
probability, and H/log|A| on the seed prompts (the post's five; mean over them). Then, per regime, the mean of
H/log|A| over seeds with its 95% t-interval, and with --against R the paired (same seed) difference from regime R.
The base's own top answers are printed first. Reads stored results only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_lab.evaluation.metrics import interval  # noqa: E402
from collapse_lab.lab.report.records import run_record  # noqa: E402


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["prompts"]


def tops(prompts: list[dict]) -> str:
    counts = Counter(p["top_answer"] for p in prompts).most_common(2)
    return ", ".join(f"{a!r} on {n}" for a, n in counts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablation", type=Path, help="an ablation directory (evals/)")
    ap.add_argument("--suite", default="heldout", help="the suite whose top answers are counted (default heldout)")
    ap.add_argument("--against", help="a regime to pair each seed's H/log|A| with")
    args = ap.parse_args(argv)
    evals = args.ablation / "evals"
    if not (evals / "base" / f"{args.suite}.json").is_file():
        have = sorted(p.stem for p in (evals / "base").glob("*.json")) if (evals / "base").is_dir() else []
        raise SystemExit(f"error: no evals/base/{args.suite}.json in {args.ablation}; suites evaluated: "
                         f"{', '.join(have) or 'none'}")
    regimes = sorted(p.name for p in evals.iterdir() if p.is_dir() and p.name != "base")
    if args.against and args.against not in regimes:
        raise SystemExit(f"error: --against {args.against!r}: not a regime of {args.ablation}; valid: {', '.join(regimes)}")
    base = load(evals / "base" / f"{args.suite}.json")
    print(f"{args.ablation.name}: top answers on the {len(base)} '{args.suite}' prompts; H/log|A| on the seed prompts")
    print(f"base: {tops(base)}; H/log|A| {run_record(evals / 'base')['norm_entropy']:.3f}")
    h = {}
    for name in regimes:
        h[name] = {}
        for d in sorted((evals / name).glob("s*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1):
            if not (d / f"{args.suite}.json").is_file() or not d.name[1:].isdigit():
                continue
            prompts = load(d / f"{args.suite}.json")
            h[name][d.name] = run_record(d)["norm_entropy"]  # the report's H/log|A| on the seed prompts
            top_p = sum(p["top_prob"] for p in prompts) / len(prompts)
            print(f"  {name} {d.name}: {tops(prompts)}; mean top p {top_p:.2f}; H/log|A| {h[name][d.name]:.3f}")
    print("regime | seeds | H/log|A| on the seed prompts [95%]" + (f" | minus {args.against}, paired by seed" if args.against else ""))
    for name in regimes:
        i = interval(list(h[name].values()), bounds=(0.0, 1.0))
        row = f"{name} | {i['n']} | " + ("-" if i["mean"] is None else f"{i['mean']:.3f}") \
            + ("" if i["lo"] is None else f" [{i['lo']:.3f}, {i['hi']:.3f}]")
        if args.against and name != args.against:
            common = sorted(set(h[name]) & set(h[args.against]))
            j = interval([h[name][s] - h[args.against][s] for s in common])
            row += " | " + ("-" if j["mean"] is None else f"{j['mean']:+.3f}") \
                + ("" if j["lo"] is None else f" [{j['lo']:+.3f}, {j['hi']:+.3f}]")
        print(row)


if __name__ == "__main__":
    main()
