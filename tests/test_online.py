"""RLOO and GRPO through TRL's trainers (collapse_lab/regimes/rloo.py, grpo.py, trl_online.py): the lab's reward as
a TRL reward function, a few steps on the tiny base with reward=gold and reward=rm, their budgets."""

import json

import pytest
import torch
from safetensors.torch import load_file

from collapse_lab.regimes import registry
from collapse_lab.core.config import ConfigError, compose
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.stages.rewards import GoldReward, make_reward, reward_func
from collapse_lab.world.world import make_world
from conftest import TINY_PRETRAIN

SMALL = ["ratings.prompts=8", "ratings.max_new_tokens=3", "reward_model.epochs=1", "world.rater.noise_std=1.5"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"]))


def test_the_labs_reward_as_a_trl_reward_function():
    cfg = compose("lab", [])
    world = make_world(cfg.world)
    p = world.seed_prompts[0].text
    score = reward_func(GoldReward(world, 0), world, eos_token_id=0, missing_eos_penalty=1.0)
    ended, cut = score([p, p], [" 42", " 42"], [[5, 6, 0], [5, 6]])
    expected = world.rater.expected(world.prompt(p), " 42", True)
    assert abs(ended - expected) <= 1.5 and cut < ended  # cut off: not ended per the rater, and penalised


def test_make_reward_never_trains(tmp_path):
    cfg = compose("lab", [f"checkpoints_dir={tmp_path}", "reward=rm"])
    with pytest.raises(ConfigError, match="no finished reward model"):
        make_reward(cfg, make_world(cfg.world), "cpu")
    assert not (tmp_path / "reward").exists() and not (tmp_path / "ratings").exists()


@pytest.mark.parametrize("recipe, reward", [("rloo-kl0.1", "gold"), ("grpo", "rm")])
def test_online_regimes_train_and_record_their_budget(tmp_path, tiny_base, recipe, reward):
    section = registry.REGIMES[recipe].section
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}",
                          f"recipe={recipe}", f"reward={reward}", *SMALL, f"{section}.steps=2",
                          f"{section}.rollout_batch_size=8", f"{section}.max_new_tokens=3", f"{section}.lr=1e-2"])
    out = registry.run(recipe, cfg)  # reward=rm: the registry trains the reward model first, not the regime
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["stage"] == section and m["steps"] == 2 and m["base_path"] == str(tiny_base)
    assert m["samples_scored"] == registry.planned_budget(cfg, recipe) == (16 if reward == "gold" else 8 * 4)
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train, curve = [r for r in rows if "loss" in r], [r for r in rows if "frontier/kl" in r]
    assert len(train) == 2 and all("kl" in r for r in train)  # β > 0: TRL logs the KL to the base
    # the curve along training (curve.points): its points are kept, as PPO's and DPO's are, for the report's
    # matched-KL comparison; the last one at the last step, after the policy moved
    assert curve and curve[-1]["step"] == 2 and curve[-1]["frontier/kl"] > 0, rows
    assert len(train) + len(curve) == len(rows)


@pytest.mark.parametrize("recipe", ["rloo-kl0.1", "grpo"])
def test_online_regimes_train_a_lora_adapter(tmp_path, tiny_base, recipe):
    """peft.enabled (the real-base preset's LoRA): TRL's trainer gets the adapter's config, its reference is
    the base with the adapter off, and the run saves plain merged weights in which only the adapted linear
    layers moved (the embedding and norms did not)."""
    section = registry.REGIMES[recipe].section
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}",
                          f"recipe={recipe}", "reward=gold", *SMALL, f"{section}.steps=2", "peft.enabled=true",
                          "peft.r=4", f"{section}.rollout_batch_size=8", f"{section}.max_new_tokens=3",
                          f"{section}.lr=1e-2"])
    out = registry.run(recipe, cfg)
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)  # merged: no adapter keys
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("proj" in k for k in moved), moved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert len(rows) == 2 and all("kl" in r for r in rows)
