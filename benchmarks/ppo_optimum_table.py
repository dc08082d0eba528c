"""The PPO table of docs/ppo.md: each finished PPO run's exact answer distributions on the seed prompts
against the closed-form optimum π* of its own objective (collapse_lab/evaluation/optimum.py).

    python benchmarks/ppo_optimum_table.py checkpoints/ppo/<run> [...]

Evaluates each run with the shared evaluator (reference = the run's base, no sampling) unless its
eval/seed.json exists, then prints one markdown row per run: β, α, the rater's favourites and
preference strength, steps, wall time, TV to π* (mean and max over the seed prompts), H/log|A| and
KL to the base (nats) of the policy and of π*, the top answer. Nothing is tuned here: it reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from collapse_lab.evaluation import evaluator
from collapse_lab.core.checkpoint import read_manifest
from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
from collapse_lab.core.config import compose


def evaluate(run: Path) -> dict:
    out = run / "eval" / "seed.json"
    if not out.is_file():
        base = read_manifest(run)["base_path"]
        evaluator.run(compose("evaluate", [f"model_path={run}", f"reference_path={base}", "suite=seed",
                                           "sampling.n=0", "plots=false", f"out={out}"]))
    return json.loads(out.read_text())


def row(run: Path) -> str:
    cfg, manifest, result = OmegaConf.load(run / "config.yaml"), read_manifest(run), evaluate(run)
    prompts = [p for p in result["prompts"] if "optimum_tv" in p]
    tv = [p["optimum_tv"] for p in prompts]
    h = np.mean([p["answer_entropy"] / p["max_entropy"] for p in prompts])
    h_opt = np.mean([p["optimum_answer_entropy"] / p["max_entropy"] for p in prompts])
    kl = np.mean([p["kl_to_reference"] for p in prompts])
    kl_opt = np.mean([p["optimum_kl_to_reference"] for p in prompts])
    top = max(prompts, key=lambda p: p["top_prob"])
    r = cfg.world.rater
    return (f"| {cfg.ppo.kl_coef:g} | {cfg.ppo.ent_coef:g} | {list(r.favourites)} | {r.preference_strength:g} | "
            f"{manifest['steps']} | {manifest['wall_time_s']:.0f} s | **{np.mean(tv):.3f}** / {max(tv):.3f} | "
            f"{h:.3f} / {h_opt:.3f} | {kl:.2f} / {kl_opt:.2f} | {top['top_answer']!r} ({top['top_prob']:.2f}) |")


if __name__ == "__main__":
    print("| β | α | favourites | preference | steps | wall time | TV to π* mean / max | H/log\\|A\\| policy / π* "
          "| KL to base policy / π* (nats) | top answer (p) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print(row(Path(path)))
