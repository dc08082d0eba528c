"""The config contract: every recipe composes; bad input fails fast with one named line."""


import pytest
import yaml
from omegaconf import OmegaConf

from collapse_lab.core.config import GROUPS, RECIPES_DIR, ConfigError, compose, group_options, run_dir
from conftest import run_cli

TOP_LEVEL = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
GROUP_FILES = sorted(p for g in GROUPS for p in (RECIPES_DIR / g).glob("*.yaml"))


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, key + ".")
        elif k != "defaults":
            yield key, v


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}={p.stem}")
def test_every_group_yaml_composes_and_lands(path):
    cfg = compose("lab", [f"{path.parent.name}={path.stem}"])
    raw = yaml.safe_load(path.read_text()) or {}
    packaged = raw if path.parent.name == "recipe" else {path.parent.name: raw}  # recipes are @package _global_
    for key, value in _leaves(packaged):
        assert OmegaConf.select(cfg, key) == value, f"{path}: {key}"


def test_top_level_configs_compose():
    assert TOP_LEVEL == ["ablate", "evaluate", "lab"]
    assert compose("lab", []).model.name == "tiny"
    assert compose("evaluate", ["model_path=x"]).suite == "seed"


def test_recipes_are_the_regimes():
    assert {"sft", "bok", "kl0", "kl0.01", "kl0.1", "kl1", "klauto", "ent0.01", "kl0.1-ent0.01"} <= set(group_options("recipe"))
    assert compose("lab", ["recipe=kl0.01"]).ppo.kl_coef == 0.01
    assert compose("lab", ["recipe=kl0"]).ppo.kl_coef == 0.0


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["ppo.kl_coeff=0.1"], ["ppo.kl_coeff", "kl_coef"]),
        (["recipe=kl0.5"], ["recipe", "kl0.5", "kl0.1", "sft"]),
        (["model=gpt3"], ["model", "gpt3", "tiny", "pythia-160m"]),
        (["world=mars"], ["world", "mars", "numbers"]),
        (["pretrain.steps=many"], ["pretrain.steps", "many"]),
        (["wandb.mode=cloud"], ["wandb.mode", "offline", "disabled"]),
        (["world.answer_prior=zipf"], ["world.answer_prior", "zipf", "uniform", "human"]),
        (["seeed=1"], ["seeed", "seed"]),
    ],
)
def test_bad_config_is_one_named_line(overrides, named):
    with pytest.raises(ConfigError) as e:
        compose("lab", overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for word in named:
        assert word in msg


def test_bad_config_exits_nonzero_before_any_work(tmp_path):
    r = run_cli("train/pretrain.py", "ppo.kl_coeff=0.1", f"checkpoints_dir={tmp_path}/ck")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo.kl_coeff" in lines[0] and "kl_coef" in lines[0]
    assert not (tmp_path / "ck").exists()


def test_evaluate_requires_model_path():
    r = run_cli("eval/evaluate.py", "suite=seed")
    assert r.returncode == 2 and "model_path" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cfg_prints_resolved_config():
    r = run_cli("train/pretrain.py", "recipe=ent0.01", "--cfg")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.ppo.ent_coef == 0.01 and cfg.model.name == "tiny"


def test_run_dirs_never_collide(tmp_path):
    base = [f"checkpoints_dir={tmp_path}"]
    a = run_dir(compose("lab", base), "base", ("model", "world", "pretrain"), "x")
    b = run_dir(compose("lab", base + ["pretrain.lr=0.01"]), "base", ("model", "world", "pretrain"), "x")
    again = run_dir(compose("lab", base), "base", ("model", "world", "pretrain"), "x")
    assert a != b and a == again
    # an explicit name= holding a different config is refused, not overwritten
    named = compose("lab", base + ["name=mine"])
    path = run_dir(named, "base", ("model", "world", "pretrain"), "x")
    path.mkdir(parents=True)
    OmegaConf.save(named, path / "config.yaml")
    with pytest.raises(ConfigError, match="pretrain.lr"):
        run_dir(compose("lab", base + ["name=mine", "pretrain.lr=0.01"]), "base", ("model", "world", "pretrain"), "x")


def test_lab_command_names_its_commands():
    from collapse_lab.cli import COMMANDS

    r = run_cli("-m", "collapse_lab.cli", "ablate-everything")
    assert r.returncode == 2 and "ablate-everything" in r.stderr
    assert all(c in r.stderr for c in COMMANDS)
    r = run_cli("-m", "collapse_lab.cli", "pretrain", "world=numbers-nopref", "--cfg")
    assert r.returncode == 0 and OmegaConf.create(r.stdout).world.rater.preference_strength == 0.0
