"""Ratings: k rated samples per training prompt, deterministic per seed, cached."""

import json

import pytest

from collapse_lab.stages import ratings as ratings_module
from collapse_lab.core.config import ConfigError, compose
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.stages.ratings import load_ratings, rate
from conftest import TINY_PRETRAIN

SMALL = ["ratings.prompts=6", "ratings.samples_per_prompt=3", "ratings.max_new_tokens=4"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"]))


def _cfg(tmp_path, base, *extra):
    return compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={base}", *SMALL, *extra])


def test_ratings_dataset_and_manifest(tmp_path, tiny_base):
    out = rate(_cfg(tmp_path, tiny_base))
    data = load_ratings(out)
    assert {"prompt", "prompt_id", "completion", "ended", "score", "sample_index", "completion_ids"} <= set(data.column_names)
    assert len(data) == 18 and list(data["prompt_id"]) == [i for i in range(6) for _ in range(3)]
    assert list(data["sample_index"]) == [0, 1, 2] * 6
    assert all(1 <= s <= 7 for s in data["score"])
    for ids, ended in zip(data["completion_ids"], data["ended"]):
        assert 1 <= len(ids) <= 4 and ended == (ids[-1] == 0)  # EOS (id 0) closes an ended sample
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["stage"] == "ratings" and m["samples_scored"] == 18
    assert m["base_path"] == str(tiny_base) and m["steps"] == 0 and "git_commit" in m and "versions" in m


def test_deterministic_per_seed_and_cached(tmp_path, tiny_base, monkeypatch):
    a = load_ratings(rate(_cfg(tmp_path / "a", tiny_base)))
    b = load_ratings(rate(_cfg(tmp_path / "b", tiny_base)))
    assert a.to_list() == b.to_list()
    c = load_ratings(rate(_cfg(tmp_path / "c", tiny_base, "seed=1")))
    assert a["completion_ids"] != c["completion_ids"] or a["prompt"] != c["prompt"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished ratings stage was recomputed")

    monkeypatch.setattr(ratings_module, "rate_samples", fail)
    assert rate(_cfg(tmp_path / "a", tiny_base)) == rate(_cfg(tmp_path / "a", tiny_base))


def test_bandit_ratings_are_one_token_and_the_table_s_scores(tmp_path, tiny_base):
    cfg = _cfg(tmp_path, tiny_base, "world=bandit", "ratings.prompts=16")
    data = load_ratings(rate(cfg))
    assert all(len(ids) == 1 for ids in data["completion_ids"])
    table = {t: r for t, r in cfg.world.rewards}
    assert list(data["score"]) == [table.get(c, 0.0) for c in data["completion"]]


def test_bad_ratings_config_is_one_line(tmp_path, tiny_base):
    with pytest.raises(ConfigError, match="ratings.samples_per_prompt must be >= 1"):
        rate(_cfg(tmp_path, tiny_base, "ratings.samples_per_prompt=0"))
