"""Best-of-k as a regime (`recipe=bok`): no training; the policy is "sample k from the base, keep
the one the rater scores highest". Its exact answer distribution is a closed form of the base's
(collapse_lab/evaluation/best_of_k.py, with the formula and its ties).

`make_bok(cfg)` writes checkpoints/bok/<name>/bok.json (base path, k, the world whose rater scores); the
evaluator evaluates such a directory through best_of_k.load_policy.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from collapse_lab.core.checkpoint import publish
from collapse_lab.core.console import note
from collapse_lab.core.config import ConfigError, run_dir
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.stages.stage import BASE, SELECTION, Stage, run_stage
from collapse_lab.evaluation.best_of_k import SPEC

STAGE = "bok"


def bok_dir(cfg: DictConfig, named: bool = True) -> Path:
    return run_dir(cfg, STAGE, REGIME.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-bo{cfg.ratings.samples_per_prompt}",
                   named)


def make_bok(cfg: DictConfig, named: bool = True) -> Path:
    """Write (or find) the best-of-k spec: k = ratings.samples_per_prompt, the same k FeedME keeps the best of.

    The budget: no ratings in training (samples_scored 0), k ratings per query at inference
    (`ratings_per_query`), which collapse_lab.lab.budget reports as not comparable with trained regimes.
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
        note(f"saved {out} (best of {k} of {base})")
    return out


# the regime's one declaration (collapse_lab/stages/stage.py): no section of its own (k is the ratings' k, FeedME's),
# not seeded (exact), no training ratings; its keys: the base, the world (its rater), k
REGIME = Stage(STAGE, make_bok, recipe=STAGE, consumes=(BASE,), produces="sampler", group=SELECTION,
               rating_budget=lambda cfg: 0, seeded=False, reads=("ratings.samples_per_prompt",))
