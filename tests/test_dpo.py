"""DPO / IPO (collapse_lab/regimes/dpo.py): pairs from FeedME's ratings, TRL's DPOTrainer, the budget it records."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from collapse_lab.regimes import registry
from collapse_lab.core.config import ConfigError, compose
from collapse_lab.regimes.dpo import preference_pairs
from collapse_lab.stages.pretrain import pretrain
from conftest import TINY_PRETRAIN

SMALL = ["ratings.prompts=8", "ratings.samples_per_prompt=4", "ratings.max_new_tokens=4", "dpo.batch_size=4",
         "dpo.epochs=1", "world.rater.noise_std=1.5"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"]))


def test_pairs_are_top_vs_bottom_per_prompt_ties_dropped_and_counted():
    rows = [{"prompt_id": i, "score": float(s), "sample_index": j}
            for i, scores in enumerate([[3, 7, 5, 7], [2, 2, 2, 2], [6, 1, 4, 1]]) for j, s in enumerate(scores)]
    pairs, ties = preference_pairs(Dataset.from_list(rows))
    # prompt 0: top 7 (the lower index, 1: FeedME's pick) vs bottom 3 (row 0); prompt 1 all tied;
    # prompt 2: top row 8 vs bottom 1 (the higher index among the tied 1s: row 11)
    assert pairs == [(1, 0), (8, 11)] and ties == 1


def test_recipes_set_beta_and_the_loss():
    assert compose("lab", ["recipe=dpo0.1"]).dpo.beta == 0.1 and compose("lab", ["recipe=dpo0.5"]).dpo.beta == 0.5
    assert compose("lab", ["recipe=ipo0.1"]).dpo.loss_type == "ipo"
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        compose("lab", ["dpo.loss_type=kto"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        compose("lab", ["dpo.beta=0"])
    assert registry.REGIMES["dpo0.1"].group == "offline preference"
    cfg = compose("lab", ["recipe=dpo0.1"])
    assert registry.planned_budget(cfg, "dpo0.1") == registry.planned_budget(cfg, "sft")  # FeedME's ratings
    assert registry.upstream(cfg, "dpo0.1") == ["base", "ratings"]  # no reward model


@pytest.mark.parametrize("recipe", ["dpo0.1", "ipo0.1"])
def test_dpo_trains_from_feedmes_ratings_and_records_the_budget(tmp_path, tiny_base, recipe):
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}",
                          f"recipe={recipe}", *SMALL])
    out = registry.run(recipe, cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["stage"] == "dpo" and m["base_path"] == str(tiny_base)
    assert m["samples_scored"] == 32 and m["pairs"] + m["ties_dropped"] == 8 and m["pairs"] >= 1
    assert m["steps"] == -(-m["pairs"] // 4) and m["tokens_trained"] > 0 and m["loss_type"] == cfg.dpo.loss_type
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert registry.run(recipe, cfg) == out  # finished: found, not redone
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "frontier/kl" in line]
    assert curve and curve[-1]["step"] == m["steps"] and {r["budget/samples_scored"] for r in curve} == {32}
