"""Reward model: pairs from the ratings, TRL RewardTrainer, held-out accuracy above chance on the world."""

import json
import random

import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset

from collapse_lab.core.config import compose
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.stages.reward_model import fit_reward_model, pairwise_accuracy, preference_pairs, split_prompts, train_reward_model
from collapse_lab.stages.rewards import make_reward
from collapse_lab.world.world import make_world
from conftest import TINY_PRETRAIN


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"]))


def test_pairs_split_and_accuracy():
    data = Dataset.from_dict({"prompt_id": [0, 0, 0, 1, 1], "score": [5.0, 7.0, 5.0, 3.0, 3.0]})
    assert sorted(preference_pairs(data, {0, 1})) == [(1, 0), (1, 2)]  # same prompt, different scores only
    assert preference_pairs(data, {1}) == []
    train, held = split_prompts(list(range(10)), 0.2, seed=0)
    assert len(held) == 2 and train | held == set(range(10)) and not train & held
    texts = ["a", "b", "a", "c", "b", "a", "d", "c", "d", "e"]  # ten draws of five prompt texts
    train, held = split_prompts(list(range(10)), 0.4, seed=0, texts=texts)
    assert train | held == set(range(10)) and not train & held
    held_texts, train_texts = {texts[i] for i in held}, {texts[i] for i in train}
    assert len(held_texts) == 2 and not held_texts & train_texts  # split by TEXT: no text on both sides
    assert pairwise_accuracy([1.0, 2.0, 0.0], [(1, 0), (0, 2), (2, 1)]) == pytest.approx(2 / 3)
    assert pairwise_accuracy([1.0, 1.0], [(0, 1)]) == 0.5  # a tie is half right


def world_ratings(world, n_prompts: int, seed: int = 0) -> Dataset:
    """Ratings of the embedded world without sampling a model: per number prompt, 4 completions of
    mixed quality (the world's own answer, out of range, not a number, not ended), gold-rated."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        p = world.train_prompt(rng)
        options = [(world.sample_completion(p, rng), True), (f" {p.high + rng.randint(5, 50)}", True),
                   (rng.choice([" the", " a number", ".", "\n"]), True), (world.sample_completion(p, rng) + " and", False)]
        for j, (c, ended) in enumerate(options):
            rows.append({"prompt": p.text, "prompt_id": i, "completion": c, "ended": ended, "sample_index": j,
                         "score": world.rater(p, c, rng, ended), "expected": world.rater.expected(p, c, ended)})
    return Dataset.from_list(rows)


def test_reward_model_beats_chance_on_held_out_pairs_of_the_world(tmp_path, tiny_base):
    cfg = compose("lab", ["wandb.mode=disabled", f"base_path={tiny_base}", "reward_model.epochs=3",
                          "reward_model.lr=1e-3", "reward_model.batch_size=16", "reward_model.eval_fraction=0.25"])
    metrics = fit_reward_model(cfg, world_ratings(make_world(cfg.world), 48), str(tiny_base), tmp_path / "rm")
    assert metrics["eval_pairs"] >= 40
    assert metrics["eval_pairwise_accuracy"] > 0.7, metrics
    assert metrics["eval_spearman_expected"] > 0.3, metrics


def test_stage_writes_manifest_and_serves_the_reward_interface(tmp_path, tiny_base):
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}",
                          "ratings.prompts=16", "ratings.max_new_tokens=3", "world.rater.noise_std=1.5",
                          "reward_model.epochs=1", "reward=rm"])
    out = train_reward_model(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["stage"] == "reward" and m["samples_scored"] == 64
    assert m["base_path"] == str(tiny_base) and m["steps"] >= 1 and m["tokens_trained"] > 0
    assert {"eval_pairwise_accuracy", "eval_spearman_gold", "eval_spearman_expected"} <= set(m)
    assert train_reward_model(cfg, named=False) == out  # finished: found, not redone
    assert AcceleratorState().mixed_precision == "no"  # fp32 as configured (TRL's RewardConfig defaults to bf16)
    # PPO's reward=rm finds the same model through the one reward interface
    world = make_world(cfg.world)
    reward = make_reward(cfg, world, "cpu")
    p = world.train_prompt(random.Random(0))
    scores = reward([p, p], [" 7", " the"], [True, False])
    assert scores.shape == (2,) and reward.samples_scored == 64


def test_lora_reward_model_saves_a_plain_classifier(tmp_path, tiny_base):
    """peft.enabled (the real-base preset): a LoRA adapter on the trunk, the score head in full, merged on save:
    the directory loads as a plain sequence classifier through the reward interface; only the adapter and
    the head trained; the run directory's hash includes peft (another model than the full fine-tune's)."""
    from collapse_lab.stages.reward_model import reward_dir
    from collapse_lab.stages.rewards import ModelReward
    from transformers import AutoModelForSequenceClassification

    args = ["wandb.mode=disabled", f"base_path={tiny_base}", "reward_model.epochs=2", "reward_model.lr=1e-3",
            "reward_model.batch_size=16", f"checkpoints_dir={tmp_path}"]
    cfg = compose("lab", args + ["peft.enabled=true", "peft.r=4"])
    assert reward_dir(cfg) != reward_dir(compose("lab", args))
    metrics = fit_reward_model(cfg, world_ratings(make_world(cfg.world), 24), str(tiny_base), tmp_path / "rm")
    assert metrics["eval_pairs"] > 0
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert not any("lora" in k for k in saved.state_dict())
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=1)
    moved = [k for k, v in saved.state_dict().items() if k in base.state_dict() and "score" not in k
             and not torch.equal(v, base.state_dict()[k])]
    assert moved and all("proj" in k or "fc" in k or "attn" in k or "mlp" in k for k in moved)  # adapted linears only
    world = make_world(cfg.world)
    p = world.train_prompt(random.Random(0))
    assert ModelReward(str(tmp_path / "rm"), "cpu")([p, p], [" 7", " the"], [True, True]).shape == (2,)
