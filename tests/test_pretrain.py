"""Pretraining: a few steps change the weights, save a loadable base, resume after a kill."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

from collapse_lab.config import compose
from collapse_lab.models import build_base_model
from collapse_lab.pretrain import base_dir, pretrain
from conftest import TINY_PRETRAIN


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
    assert base_dir(_cfg(tmp_path)) != base_dir(_cfg(tmp_path, "world.rater.noise_std=1.0"))
    assert base_dir(_cfg(tmp_path)) == base_dir(_cfg(tmp_path, "seed=5", "recipe=kl0"))  # regime keys: not the base's
