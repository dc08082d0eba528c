"""W&B sweep files (valid for `wandb sweep`, every grid point a valid ablation) and the local runner."""

import json

import pytest
import yaml

from collapse_lab.lab import ablate, sweep
from collapse_lab.core.config import ConfigError
from conftest import REPO, TINY_PRETRAIN
from test_ablate import TINY_EVAL, fake_stages

SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))


def test_the_three_sweeps_exist():
    assert {p.stem for p in SWEEPS} >= {"beta", "alpha", "preference", "rating_budget"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_a_wandb_grid_whose_every_point_is_a_valid_ablation(path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # offline unless $WANDB_MODE says otherwise (tests/test_faults.py)
    spec = yaml.safe_load(path.read_text())
    # what `wandb sweep` / `wandb agent` need: a method, parameters with value(s), a command that
    # passes the parameters Hydra-style to a program that exists
    assert spec["method"] == "grid" and spec["metric"]["goal"] in ("maximize", "minimize")
    assert "${args_no_hyphens}" in spec["command"] and (REPO / spec["program"]).is_file()
    assert spec["command"][spec["command"].index("${program}") + 1] == "ablate"
    loaded = sweep.load(path)
    points = sweep.grid(loaded)
    assert len(points) >= 3 and 1 <= len(sweep.swept(loaded)) <= 2
    regime = spec["metric"]["name"].split("/")[0]
    for pt in points:
        p = ablate.plan(sweep.point_overrides(loaded, pt, []))
        assert regime in p.cfg.regimes
        lab = p.lab_config(p.seeds[0], regime)
        assert lab.wandb.mode == "offline" and lab.wandb.group == spec["name"]
    # every swept value reaches the stage's config
    from omegaconf import OmegaConf

    last = ablate.plan(sweep.point_overrides(loaded, points[-1], [])).lab_config(0, regime)
    for key in sweep.swept(loaded):
        lab_key = "world.rater.preference_strength" if key == "world.preference" else key
        assert OmegaConf.select(last, lab_key) == points[-1][key]


@pytest.mark.parametrize("text, message", [
    ("method: bayes\nparameters: {seeds: {value: 1}}", "the local runner runs grids"),
    ("method: grid\nparameters: {}", "non-empty 'parameters'"),
    ("method: grid\nparameters: {seeds: {values: []}}", "must be a non-empty list"),
    ("method: grid\nparameterz: {seeds: {value: 1}}", "non-empty 'parameters'"),
    ("method: grid\nfoo: 1\nparameters: {seeds: {value: 1}}", "unknown keys ['foo']"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        sweep.load(f)
    assert message in str(e.value)


def test_local_runner_runs_the_grid_and_writes_one_comparison(tmp_path, monkeypatch):
    """The grid swept over bases (pretrain.seed), as recipes/sweeps/bases.yaml does: one ablation per point, one
    comparison, and the primary pair's call per base, each base named by its own pretrain.seed."""
    stages = fake_stages()
    monkeypatch.setattr(ablate, "load_stage", lambda spec: stages[spec])
    f = tmp_path / "mini.yaml"
    f.write_text(yaml.safe_dump({"name": "mini", "method": "grid", "program": "collapse_lab/cli.py",
                                 "metric": {"name": "kl0.1/norm_entropy", "goal": "maximize"},
                                 "parameters": {"pretrain.seed": {"values": [0, 1]},
                                                "regimes": {"value": "[sft,kl0.1]"}, "seeds": {"value": 1}},
                                 "command": ["${program}", "ablate", "${args_no_hyphens}"]}))
    out = sweep.main([str(f), f"checkpoints_dir={tmp_path / 'ck'}", "wandb.mode=disabled", "jobs=1",  # stand-ins: here
                      *TINY_EVAL, *TINY_PRETRAIN])
    assert out == tmp_path / "ck" / "sweeps" / "mini"
    rep = json.loads((out / "report.json").read_text())
    assert [(r["point"]["pretrain.seed"], r["regime"]) for r in rep["rows"]] == [  # + FeedME's control, shown
        (0, "sft"), (0, "kl0.1"), (0, "sft-random"), (1, "sft"), (1, "kl0.1"), (1, "sft-random")]
    assert [r["call"] for r in rep["rows"] if r["regime"] == "sft-random"] == ["control of sft"] * 2
    assert len({r["ablation"] for r in rep["rows"]}) == 2  # one ablation per point
    md = (out / "report.md").read_text()
    assert sum(line.startswith("| 1 | ") for line in md.splitlines()) == 3 and (out / "plots" / "sweep.png").exists()
    assert [b["base"] for b in rep["bases"]] == ["pretrain.seed=0", "pretrain.seed=1"]
    assert "## The primary pair per base" in md and md.count("| pretrain.seed=") == 2
    assert (out / "plots" / "bases.png").stat().st_size > 1000 and "![bases.png](plots/bases.png)" in md

