"""Every recipe in recipes/recipe/ composes and runs for 2 steps on the tiny base, through the registry (its
upstream stages resolved first: ratings, and the reward model behind reward=rm), and records its budget."""

import json

import pytest

from collapse_lab.regimes import registry
from collapse_lab.core.config import compose, group_options
from collapse_lab.stages.pretrain import pretrain
from conftest import TINY_PRETRAIN

TWO_STEPS = [
    "wandb.mode=disabled", "reward=rm", "ratings.prompts=8", "ratings.max_new_tokens=3", "reward_model.epochs=1",
    "world.rater.noise_std=1.5", "sft.batch_size=4", "sft.epochs=1", "dpo.batch_size=4", "dpo.epochs=1",
    "ppo.steps=2", "ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "ppo.max_new_tokens=3", "ppo.save_every=2",
    *[f"{s}.{k}" for s in ("rloo", "grpo") for k in ("steps=2", "rollout_batch_size=8", "max_new_tokens=3")],
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny base and one checkpoints directory for every recipe: the ratings and reward model are shared."""
    root = tmp_path_factory.mktemp("recipes")
    base = pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={root}"]))
    return [f"checkpoints_dir={root}", f"base_path={base}", *TWO_STEPS]


def test_every_recipe_is_a_registered_regime():
    assert sorted(group_options("recipe")) == sorted(r.recipe for r in registry.REGIMES.values())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_runs_two_steps(lab, recipe):
    cfg = compose("lab", [*lab, f"recipe={recipe}"])
    out = registry.run(recipe, cfg, named=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and 0 <= m["steps"] <= 2 * cfg.sft.rounds, m  # iterated FeedME: per round
    assert m["samples_scored"] == registry.planned_budget(cfg, recipe), (m["samples_scored"], recipe)
