"""Pretraining: a few steps change the weights, save a loadable base, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

from collapse_lab.core.config import compose
from collapse_lab.models.models import build_base_model
from collapse_lab.stages.pretrain import base_dir, last_complete_checkpoint, pretrain
from conftest import REPO, TINY_PRETRAIN


def _cfg(tmp_path, *extra):
    return compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path}", *extra])


def test_pretrain_writes_a_loadable_base_that_moved(tmp_path):
    cfg = _cfg(tmp_path)
    out = pretrain(cfg)
    assert out == base_dir(cfg) and out.parent == tmp_path / "base"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 6
    assert manifest["tokens_seen"] > 6 * 4 * 5 and manifest["wall_time_s"] > 0
    assert {"torch", "transformers"} <= set(manifest["versions"]) and "git_commit" in manifest
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not (out / "trainer").exists()

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and tok.eos_token and tok.pad_token != tok.eos_token
    # " 3" is a token-prefix of " 37": numbers span several tokens
    three, thirty_seven = (tok(s, add_special_tokens=False).input_ids for s in (" 3", " 37"))
    assert len(thirty_seven) > len(three) and thirty_seven[: len(three)] == three

    set_seed(cfg.pretrain.seed)
    init = build_base_model(cfg.model, tok).state_dict()
    trained = load_file(out / "model.safetensors")
    moved = [k for k in trained if not torch.equal(trained[k], init[k])]
    assert len(moved) == len(trained), f"unchanged tensors: {set(trained) - set(moved)}"


def test_micro_batches_sort_each_step_by_length_and_train_the_same_steps(tmp_path):
    """pretrain.micro_batches: one step's sequences, sorted by length, in several forwards: the same loss
    curve as one padded batch (to float rounding), and micro-batches of similar length."""
    from collapse_lab.stages.pretrain import SortedBatches

    order = list(SortedBatches([5, 1, 9, 3, 7, 2, 8, 4], batch=4, seed=0))
    assert sorted(order) == list(range(8)) and order != list(range(8))  # a permutation, shuffled
    lengths = [[5, 1, 9, 3, 7, 2, 8, 4][j] for j in order]
    assert lengths[:4] == sorted(lengths[:4]) and lengths[4:] == sorted(lengths[4:])  # sorted within each step
    steps = lambda o: [set(o[:4]), set(o[4:])]  # which sequences each step trains on: the seed's, not the lengths'
    assert steps(list(SortedBatches([1] * 8, 4, 0))) == steps(order) != steps(list(SortedBatches([1] * 8, 4, 3)))
    losses = []
    for micro in (1, 2):
        out = pretrain(_cfg(tmp_path, f"pretrain.micro_batches={micro}", "pretrain.log_every=1", f"name=m{micro}"))
        losses.append([r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r])
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_interrupted_run_resumes_and_finished_run_is_not_redone(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    original = Trainer.training_step

    def killed_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    out = base_dir(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["steps"] == 2  # the last save
    monkeypatch.setattr(Trainer, "training_step", original)

    pretrain(cfg)
    assert "resuming from" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 6

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    pretrain(cfg)
    assert "already finished" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_different_configs_get_different_dirs(tmp_path):
    assert base_dir(_cfg(tmp_path)) != base_dir(_cfg(tmp_path, "world.mix.stories=0.5"))
    assert base_dir(_cfg(tmp_path)) != base_dir(_cfg(tmp_path, "pretrain.seed=1"))
    # ONE base for every regime: regime keys, the rater and the bandit world are not the base's
    same = [("seed=5", "recipe=kl0"), ("world=numbers-nopref",), ("world=bandit",), ("world.rater.noise_std=1.0",)]
    for overrides in same:
        assert base_dir(_cfg(tmp_path)) == base_dir(_cfg(tmp_path, *overrides)), overrides
    # name= names the stage being run, not the base a later stage builds on the way
    assert base_dir(_cfg(tmp_path, "name=mine")).name == "mine"
    assert base_dir(_cfg(tmp_path, "name=mine"), named=False) == base_dir(_cfg(tmp_path))


def test_resume_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json yet
    (tmp_path / "checkpoint-10" / "model.safetensors").write_text("")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None


def test_sigkilled_run_resumes_with_the_same_command(tmp_path):
    """A real kill (SIGKILL, no cleanup) after the first save; the same command then finishes the run."""
    args = [sys.executable, "train/pretrain.py", *TINY_PRETRAIN, "pretrain.steps=400", "pretrain.save_every=5",
            f"checkpoints_dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("base/*/trainer/checkpoint-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first save"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (out,) = (tmp_path / "base").iterdir()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 400
