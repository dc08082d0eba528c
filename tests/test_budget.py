"""Budget bookkeeping: matched iff the same base and the same number of samples scored."""

import json

import pytest

from collapse_lab.lab.budget import budget, compare
from collapse_lab.regimes.registry import planned_budget as planned
from collapse_lab.core.config import compose


def manifest(stage, n, base="checkpoints/base/b", **extra):
    return {"stage": stage, "samples_scored": n, "base_path": base, "steps": 10, "tokens_trained": 100,
            "wall_time_s": 1.0, **extra}


def test_same_budget_and_base_is_matched():
    ok, msg = compare(manifest("sft", 1024), manifest("ppo", 1024))
    assert ok and "1024" in msg and "\n" not in msg


def test_different_budget_or_base_is_flagged():
    ok, msg = compare(manifest("sft", 1024), manifest("ppo", 12800))
    assert not ok and "NOT matched" in msg and "12.5x" in msg
    ok, msg = compare(manifest("sft", 1024), manifest("ppo", 1024, base="other"))
    assert not ok and "different bases" in msg


def test_best_of_k_and_missing_budgets_are_not_comparable():
    ok, msg = compare(manifest("bok", 0, ratings_per_query=4), manifest("sft", 1024))
    assert not ok and "best-of-4" in msg
    ok, msg = compare({"stage": "ppo"}, manifest("sft", 1024))
    assert not ok and "no samples_scored" in msg


def test_reads_run_directories(tmp_path):
    for name, n in (("a", 64), ("b", 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest("sft", n)))
    assert budget(tmp_path / "a")["samples_scored"] == 64
    assert compare(tmp_path / "a", tmp_path / "b") == (True, "matched: a and b both scored 64 samples")
    with pytest.raises(FileNotFoundError):
        budget(tmp_path / "missing")


def test_default_recipes_spend_the_same_ratings_on_feedme_and_the_reward_model():
    sft = compose("lab", ["recipe=sft"])
    rm = compose("lab", ["recipe=kl0.1", "reward=rm"])
    assert planned(sft, "sft") == planned(rm, "reward_model") == planned(rm, "kl0.1") == sft.ratings.prompts * sft.ratings.samples_per_prompt
    assert planned(compose("lab", ["recipe=sft", "sft.rounds=3"]), "sft") == 3 * planned(sft, "sft")
    assert planned(compose("lab", ["recipe=bok"]), "bok") == 0
    with pytest.raises(ValueError):
        planned(sft, "nope")
