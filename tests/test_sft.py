"""FeedME: top-k selection, completion-only loss, training moves the weights, budget; and the exact check:
top-1 of k on the one-token bandit reproduces best-of-k."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset
from safetensors.torch import load_file

from collapse_lab.core.config import ConfigError, compose
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.regimes.sft import feedme_dataset, select_random, select_top, train_sft
from conftest import TINY_PRETRAIN
from tiny_models import byte_level_tokenizer, tiny_gpt2

SMALL = ["ratings.prompts=8", "ratings.samples_per_prompt=2", "ratings.max_new_tokens=4", "sft.batch_size=4",
         "sft.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"]))


def _ratings(scores_by_prompt):
    rows = [{"prompt": f"p{i}", "prompt_id": i, "completion": f"c{i}{j}", "completion_ids": [j + 1], "ended": True,
             "score": float(s), "sample_index": j} for i, scores in enumerate(scores_by_prompt) for j, s in enumerate(scores)]
    return Dataset.from_list(rows)


def test_select_top_per_prompt_ties_and_threshold():
    data = _ratings([[3, 7, 5, 7], [2, 2, 2, 2], [6, 1, 4, 5]])
    kept = select_top(data)
    assert list(kept["completion"]) == ["c01", "c10", "c20"]  # ties: the lower sample index
    assert sorted(select_top(data, keep_top=2)["completion"]) == ["c01", "c03", "c10", "c11", "c20", "c23"]
    assert list(select_top(data, min_score=7)["completion"]) == ["c01"]  # only 7/7; prompts without one keep none


def test_select_random_keeps_as_many_per_prompt_ignores_scores_and_is_seeded():
    """The control: per prompt exactly as many rows as select_top keeps, but not the same rows, same seed same rows."""
    from collections import Counter

    import numpy as np

    scores = np.random.default_rng(0).integers(1, 8, size=(50, 4)).tolist()
    data = _ratings(scores)
    for keep_top, min_score in ((1, None), (2, None), (3, 6)):
        top, rnd = select_top(data, keep_top, min_score), select_random(data, keep_top, min_score, seed=[0, 1])
        assert Counter(rnd["prompt_id"]) == Counter(top["prompt_id"])  # the same count per prompt draw
        assert len(set(rnd["completion"])) == len(rnd)  # without replacement
        assert list(rnd["completion"]) == list(select_random(data, keep_top, min_score, seed=[0, 1])["completion"])
    top, rnd = select_top(data), select_random(data, seed=[0, 1])
    assert len(rnd) == 50 and list(rnd["completion"]) != list(top["completion"])
    assert list(rnd["completion"]) != list(select_random(data, seed=[1, 1])["completion"])
    assert np.mean(rnd["score"]) < np.mean(top["score"]) - 1  # scores ignored: the top-rated are not favoured
    assert np.mean(rnd["score"]) == pytest.approx(np.mean(scores), abs=0.6)


def test_only_completion_tokens_carry_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = byte_level_tokenizer()
    tok.pad_token = tok.eos_token
    kept = Dataset.from_list([{"prompt": "Q: 1-9?\nA:", "completion_ids": [tok(" 7").input_ids[0], tok.eos_token_id]},
                              {"prompt": "Q: hi\nA:", "completion_ids": [tok(" 3").input_ids[0]]}])  # cut off: no EOS
    data = feedme_dataset(kept, tok)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=None, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=tiny_gpt2(tok, vocab_size=len(tok)), args=args, train_dataset=data, processing_class=tok)
    for row, kept_row in zip(trainer.train_dataset, kept):
        n_prompt = len(tok(kept_row["prompt"]).input_ids)
        assert row["input_ids"][n_prompt:] == kept_row["completion_ids"]
        assert row["labels"] == [-100] * n_prompt + kept_row["completion_ids"]
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"] != -100).sum() == 3  # two completion tokens + one


def test_train_sft_moves_weights_and_records_the_budget(tmp_path, tiny_base):
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}", "recipe=sft",
                          *SMALL])
    out = train_sft(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["stage"] == "sft" and m["base_path"] == str(tiny_base)
    steps_per_epoch = -(-8 // cfg.sft.batch_size)  # 8 kept samples
    assert m["samples_scored"] == 16 and m["rounds"][0]["kept"] == 8 and m["steps"] == cfg.sft.epochs * steps_per_epoch
    assert m["tokens_trained"] > 0 and m["wall_time_s"] > 0 and "git_commit" in m and "versions" in m
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert train_sft(cfg) == out  # finished: found, not redone
    # fp32 as configured, and no autocast left in accelerate's process-wide state for the next stage
    # (TRL's SFTConfig defaults to bf16: a PPO run after it in the same process ran its policy in bf16)
    assert AcceleratorState().mixed_precision == "no"

    cfg2 = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}", "recipe=sft",
                           *SMALL, "sft.rounds=2"])
    out2 = train_sft(cfg2)
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["samples_scored"] == 32 and [r["round"] for r in m2["rounds"]] == [1, 2]
    # evaluated along training (curve.points per round, frontier.py): each round's ratings counted when spent
    curve = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines() if "frontier/kl" in line]
    assert [r["budget/samples_scored"] for r in curve] == [16] * (len(curve) // 2) + [32] * (len(curve) // 2)
    assert [r["step"] for r in curve] == sorted(r["step"] for r in curve) and curve[-1]["step"] == m2["steps"]
    assert curve[-1]["frontier/kl"] > 0 and all(r["frontier/valid_mass"] > 0 for r in curve)

    # the control: its own directory, the same ratings (the same budget), as many samples kept
    cfg3 = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}",
                           "recipe=sft-random", *SMALL])
    assert cfg3.sft.select == "random" and cfg3.sft.epochs == cfg.sft.epochs and cfg3.sft.lr == cfg.sft.lr
    out3 = train_sft(cfg3)
    m3 = json.loads((out3 / "manifest.json").read_text())
    assert out3 != out and "random1of2" in out3.name and m3["select"] == "random" and m["select"] == "top"
    assert m3["ratings_path"] == m["ratings_path"] and m3["samples_scored"] == m["samples_scored"] == 16
    assert m3["rounds"][0]["kept"] == 8 and m3["steps"] == m["steps"]


def test_later_round_curve_points_thin_only_the_rounds_after_the_first(tmp_path, tiny_base):
    """sft.later_round_curve_points sets the along-training evaluations of rounds 2.. (round 1 keeps curve.points):
    curve.points above the steps of a round evaluates every step of both rounds; later_round_curve_points=1 leaves
    round 2 its first step (log spacing starts at step 1) and its last."""
    common = ["wandb.mode=disabled", f"base_path={tiny_base}", "recipe=sft", *SMALL, "sft.rounds=2", "curve.points=64"]

    def steps(cfg):
        out = train_sft(cfg)
        rounds = [r["steps"] for r in json.loads((out / "manifest.json").read_text())["rounds"]]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "frontier/kl" in r], rounds

    every, (n1, n2) = steps(compose("lab", [*common, f"checkpoints_dir={tmp_path / 'a'}"]))
    assert n1 > 1 and n2 > 1 and every == list(range(1, n1 + n2 + 1))
    thin, rounds = steps(compose("lab", [*common, f"checkpoints_dir={tmp_path / 'b'}", "sft.later_round_curve_points=1"]))
    assert rounds == [n1, n2] and thin == list(range(1, n1 + 1)) + [n1 + 1, n1 + n2]


def test_warmup_restarts_with_every_round(tmp_path, tiny_base):
    """sft.warmup_steps: each round's Trainer warms up from lr 0, so the first step of EVERY round leaves the model
    where the previous round ended (the same exact point on the curve); without warmup it moves it."""
    common = ["wandb.mode=disabled", f"base_path={tiny_base}", "recipe=sft", *SMALL, "sft.rounds=2", "curve.points=64"]

    def kl_by_step(*extra):
        out = train_sft(compose("lab", [*common, *extra]))
        n1 = json.loads((out / "manifest.json").read_text())["rounds"][0]["steps"]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "frontier/kl" in x]
        return {r["step"]: r["frontier/kl"] for r in rows}, n1

    warm, n1 = kl_by_step(f"checkpoints_dir={tmp_path / 'warm'}", "sft.warmup_steps=2")
    assert warm[1] == pytest.approx(0.0, abs=1e-9) and warm[n1 + 1] == pytest.approx(warm[n1], abs=1e-9)
    cold, _ = kl_by_step(f"checkpoints_dir={tmp_path / 'cold'}")
    assert cold[1] > 1e-6 and abs(cold[n1 + 1] - cold[n1]) > 1e-6


def test_curve_max_gap_adds_flagged_points_to_a_trainer_run(tmp_path, tiny_base):
    """The Trainer callback's curve.max_gap: with a tiny gap every step of a moving FeedME run is evaluated, the ones
    off the schedule (curve.points=1: the first and the last step) flagged frontier/by_gap."""
    cfg = compose("lab", ["wandb.mode=disabled", f"base_path={tiny_base}", "recipe=sft", *SMALL, "curve.points=1",
                          "curve.max_gap=1e-9", f"checkpoints_dir={tmp_path}"])
    out = train_sft(cfg)
    n = json.loads((out / "manifest.json").read_text())["steps"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "frontier/kl" in x]
    assert n > 2 and [r["step"] for r in rows] == list(range(1, n + 1))
    assert [r["step"] for r in rows if r.get("frontier/by_gap") == 1.0] == list(range(2, n))


def test_bad_sft_config_is_one_line(tmp_path, tiny_base):
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}", *SMALL,
                          "sft.keep_top=3"])
    with pytest.raises(ConfigError, match="exceeds the k=2"):
        train_sft(cfg)
    with pytest.raises(ConfigError, match="'sft.select'; valid choices: top, random"):  # at composition
        compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tiny_base}", *SMALL,
                        "sft.select=best"])


@pytest.mark.slow
def test_feedme_top1_of_k_reproduces_best_of_k_on_the_bandit(tmp_path):
    """SFT on the best of k samples IS distillation of best-of-k: TV <= 0.03 on the full vocabulary."""
    from collapse_lab.world.bandit import next_token_probs

    tok = byte_level_tokenizer()
    model = tiny_gpt2(tok, vocab_size=len(tok), init=1.0)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0  # a deterministic policy
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    prompt = "Q: 1-9?\nA:"
    pi0 = next_token_probs(model, tok, prompt)
    top = [int(i) for i in pi0.argsort(descending=True)[:3]]
    # the base's 2nd and 3rd tokens are rewarded, its favourite is not: best-of-k moves mass onto them
    rewards = f"[[{json.dumps(tok.decode([top[1]]))},1.0],[{json.dumps(tok.decode([top[2]]))},0.5]]"
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={tmp_path / 'base'}",
                          "world=bandit", f"world.prompt={json.dumps(prompt)}", f"world.rewards={rewards}",
                          "ratings.prompts=4096", "ratings.samples_per_prompt=4", "sft.epochs=4", "sft.lr=3e-3",
                          "sft.batch_size=512"])
    m = json.loads((train_sft(cfg) / "manifest.json").read_text())
    assert m["bandit_tv_kept_samples_to_best_of_k"] < 0.03  # the sampling floor
    assert m["bandit_tv_to_best_of_k"] <= 0.03, m
