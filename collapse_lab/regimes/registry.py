"""The registry of stages and regimes: the ONE table the orchestrator (ablate), the report and the budget
read. It only COLLECTS: each regime module declares itself (its `REGIME`: collapse_lab/stages/stage.py `Stage`: its
config section with the ranges of its fields, what it consumes, its group, its rating budget, its run
function), and each recipe in recipes/recipe/ names the regime module it configures (`regime.kind`).
Adding a regime: its module, its recipe YAML, one line in MODULES below, its test (docs/regimes.md).

    stage          consumes                      produces       group                 rating budget
    base           -                             base           -                     0
    ratings        base                          ratings        -                     n·k
    reward_model   base, ratings                 reward model   -                     n·k (its ratings')
    sft, sft-k16,  base, ratings                 policy         selection (FeedME)    n·k·rounds
    sft-r3, sft-r8
    sft-random     base, ratings                 policy         control of sft        n·k·rounds
    sft-r8-random  base, ratings                 policy         control of sft-r8     n·k·rounds
    bok            base                          sampler        selection             k per query, at inference
    dpo*, ipo*     base, ratings                 policy         offline preference    n·k (FeedME's ratings)
    kl*, ent*      base, reward (rm: the RM)     policy         online RL             n·k (rm) | rollouts (gold)
    rloo*, grpo    base, reward (rm: the RM)     policy         online RL             n·k (rm) | rollouts (gold)

`resolve(cfg, stage)` runs what a stage consumes, in order, before the stage itself (`run`): the
factories the stages call (make_reward, resolve_base, rate) then only FIND their inputs finished.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from collapse_lab.regimes import bok, dpo, grpo, ppo, rloo, sft
from collapse_lab.stages import pretrain, ratings, reward_model
from collapse_lab.core.config import RECIPES_DIR, ConfigError, check_run_location, register_sections
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.stages.stage import BASE, POLICY, RATINGS, REWARD_MODEL, Stage

# The regimes: one line per module, each declaring its REGIME.
MODULES = (
    sft,  # FeedME (selection) and its finite-sample control
    bok,  # best-of-k (selection, no training)
    ppo,  # PPO with a KL penalty (online RL)
    dpo,  # DPO and IPO (offline preference)
    rloo,  # RLOO through TRL (online RL)
    grpo,  # GRPO through TRL (online RL)
)
KINDS: dict[str, Stage] = {m.REGIME.name: m.REGIME for m in MODULES}  # the entry points' (train/<kind>.py)


def _base(cfg: DictConfig, named: bool = False) -> Path:
    return Path(resolve_base(cfg))


def _check_base(cfg: DictConfig) -> None:
    if not cfg.base_path and not cfg.model.path:  # the lab's own base, pretrained here
        pretrain.check_batches(cfg)


# the base's run directory hashes its own keys (collapse_lab/stages/pretrain.py STAGE_KEYS: the corpus, not the rater)
UPSTREAM: dict[str, Stage] = {
    BASE: Stage(BASE, _base, section="pretrain", produces=BASE, rating_budget=lambda cfg: 0, check=_check_base),
    RATINGS: ratings.UPSTREAM,
    REWARD_MODEL: reward_model.UPSTREAM,
}


def recipes(directory: Path = RECIPES_DIR / "recipe") -> dict[str, Stage]:
    """One entry per recipe YAML: its regime module's declaration under the recipe's name, with the recipe's
    `regime.control_of`. A recipe without a valid `regime.kind` is a ConfigError naming the valid kinds."""
    out = {}
    for path in sorted(directory.glob("*.yaml")):
        declared = OmegaConf.load(path).get("regime") or {}
        kind = declared.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{path} declares regime.kind={kind}; valid kinds: {', '.join(KINDS)}")
        out[path.stem] = dataclasses.replace(KINDS[kind], name=path.stem, recipe=path.stem,
                                             control_of=declared.get("control_of"))
    return out


REGIMES: dict[str, Stage] = recipes()
CONTROLS = {r.control_of: name for name, r in REGIMES.items() if r.control_of}  # regime -> its control

# the regimes' own config sections join the lab's schema (configuration imports no regime)
register_sections({s.section: s.schema for s in KINDS.values() if s.schema})


def stage(name: str) -> Stage:
    """A regime or an upstream stage by name; ConfigError naming the valid ones."""
    found = REGIMES.get(name) or UPSTREAM.get(name) or KINDS.get(name)
    if found is None:
        raise ConfigError(f"unknown stage '{name}'; valid choices: {', '.join([*UPSTREAM, *KINDS, *REGIMES])}")
    return found


def check_kind(cfg: DictConfig, name: str) -> None:
    """An entry point of regime kind `name` (train/<name>.py) given a recipe of another kind: ConfigError
    naming the recipe's kind and this kind's recipes (one line, exit 2, before any work)."""
    kind = OmegaConf.select(cfg, "regime.kind", default=None)
    if name in KINDS and kind is not None and kind != name:
        own = [r for r, s in REGIMES.items() if s.train is KINDS[name].train]
        raise ConfigError(f"the recipe is a {kind} recipe, not {name}: run it with train/{kind}.py, or give "
                          f"one of {name}'s recipes: {', '.join(own)}")


def upstream(cfg: DictConfig, name: str) -> list[str]:
    """The upstream stages `name` needs under `cfg`, in the order they run (each one's own needs first)."""
    order: list[str] = []

    def visit(n: str) -> None:
        for x in stage(n).needs(cfg):
            if x != POLICY and x not in order:
                visit(x)
                order.append(x)

    visit(name)
    return order


def resolve(cfg: DictConfig, name: str) -> dict[str, Path]:
    """Run (or find finished) every upstream stage of `name` under `cfg`; {stage: its directory}."""
    return {x: Path(UPSTREAM[x].train(cfg, named=False)) for x in upstream(cfg, name)}


def check_plan(cfg: DictConfig, name: str) -> None:
    """Every check of the stages `name` runs under `cfg` (its upstream ones, then itself): a ConfigError (one
    line) before the first stage does any work."""
    check_run_location(cfg)
    for x in [*upstream(cfg, name), name]:
        s = stage(x)
        if s.check is not None:
            s.check(cfg)


def run(name: str, cfg: DictConfig, named: bool = True) -> Path:
    """What an entry point does: check the recipe's kind and the whole plan, resolve the upstream stages, then
    run the stage itself."""
    check_kind(cfg, name)
    check_plan(cfg, name)
    resolve(cfg, name)
    return Path(stage(name).train(cfg, named=named))


def planned_budget(cfg: DictConfig, name: str) -> int:
    """The samples the rater will score for stage `name` under `cfg` (before running it)."""
    s = stage(name)
    if s.rating_budget is None:
        raise ConfigError(f"stage '{name}' declares no rating budget")
    return int(s.rating_budget(cfg))
