"""Run directories' manifest protocol: `already_finished` (a stage's early return) and `start_run`."""

import json

from omegaconf import OmegaConf

from collapse_lab.core.checkpoint import (
    already_finished,
    read_manifest,
    start_run,
    write_manifest,
)


def test_already_finished_only_for_a_finished_manifest_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert not already_finished(out, "{steps} steps")  # no directory yet
    write_manifest(out, {"status": "running", "steps": 3})
    assert not already_finished(out, "{steps} steps")
    assert capsys.readouterr().out == ""
    write_manifest(out, {"status": "finished", "steps": 7, "eval_pairwise_accuracy": 0.61234})
    assert already_finished(out, "{steps} steps, held-out accuracy {eval_pairwise_accuracy:.3f}")
    assert capsys.readouterr().out == f"{out}: already finished (7 steps, held-out accuracy 0.612); nothing to do\n"


def test_start_run_saves_the_config_and_a_running_manifest_over_the_previous_one(tmp_path):
    cfg = OmegaConf.create({"seed": 3, "a": {"b": "${seed}"}})
    out = tmp_path / "run"
    start_run(cfg, out, "ratings", base_path="/base")
    assert read_manifest(out) == {"stage": "ratings", "status": "running", "base_path": "/base"}
    assert OmegaConf.load(out / "config.yaml") == OmegaConf.create({"seed": 3, "a": {"b": 3}})  # resolved
    previous = {"status": "failed", "steps": 40, "started_at": "then"}
    start_run(cfg, out, "base", previous, started_at="then")
    assert json.loads((out / "manifest.json").read_text()) == {"stage": "base", "status": "running", "steps": 40,
                                                                "started_at": "then"}
