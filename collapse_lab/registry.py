"""The registry of stages and regimes: the ONE table the orchestrator (ablate), the report and the budget
read. A regime is a file (its update rule), a recipe YAML and one entry here (`Stage`: collapse_lab/stage.py).

    stage          consumes                      produces       group                 rating budget
    base           -                             base           -                     0
    ratings        base                          ratings        -                     n·k
    reward_model   base, ratings                 reward model   -                     n·k (its ratings')
    sft, sft-k16,  base, ratings                 policy         selection (FeedME)    n·k·rounds
    sft-r3
    sft-random     base, ratings                 policy         control of sft        n·k·rounds
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

from omegaconf import DictConfig

from collapse_lab import bok, dpo, grpo, ppo, pretrain, ratings, reward_model, rloo, sft
from collapse_lab.config import ConfigError, check_run_location, extend_schema
from collapse_lab.distributed import exact_div, world_size
from collapse_lab.pretrain import resolve_base
from collapse_lab.stage import (BASE, ONLINE, POLICY, RATINGS, REWARD, REWARD_MODEL, SELECTION, Stage, online_rating_budget,
                                ratings_budget)


def regimes(template: Stage, *recipes: str) -> dict[str, Stage]:
    """One entry per recipe of a regime file's `REGIME` template (its name becomes the recipe's)."""
    return {r: dataclasses.replace(template, name=r, recipe=r) for r in recipes}


def _base(cfg: DictConfig, named: bool = False) -> Path:
    return Path(resolve_base(cfg))


def _check_base(cfg: DictConfig) -> None:
    if not cfg.base_path and not cfg.model.path:  # the lab's own base, pretrained here
        pretrain.check_batches(cfg)


def _check_online(section: str):
    """An online TRL regime's batch arithmetic and options (collapse_lab/trl_online.py's, before any work)."""
    def check(cfg: DictConfig) -> None:
        s = cfg[section]
        if cfg.peft.enabled:
            raise ConfigError(f"{section}: peft.enabled is not wired to TRL's trainer here yet; use full fine-tuning")
        exact_div(s.rollout_batch_size, s.samples_per_prompt, f"{section}.rollout_batch_size over {section}.samples_per_prompt")
    return check


UPSTREAM: dict[str, Stage] = {
    BASE: Stage(BASE, _base, section="pretrain", produces=BASE, rating_budget=lambda cfg: 0, check=_check_base),
    RATINGS: Stage(RATINGS, ratings.rate, section="ratings", consumes=(BASE,), produces=RATINGS,
                   rating_budget=ratings_budget, check=ratings.check),
    REWARD_MODEL: Stage(REWARD_MODEL, reward_model.train_reward_model, section="reward_model",
                        consumes=(BASE, RATINGS), produces=REWARD_MODEL, rating_budget=ratings_budget,
                        check=reward_model.check),
}

_FEEDME = Stage("sft", sft.train_sft, section="sft", consumes=(BASE, RATINGS), group=SELECTION,
                rating_budget=lambda cfg: ratings_budget(cfg) * cfg.sft.rounds, check=sft.check)
_PPO = Stage("ppo", ppo.train_ppo, section="ppo", consumes=(BASE, REWARD), group=ONLINE,
             rating_budget=online_rating_budget("ppo"), kl_key="ppo.kl_coef", adaptive_kl_key="ppo.adaptive_kl",
             check=lambda cfg: ppo.batch_sizes(cfg.ppo, world_size()))  # its batch arithmetic divides exactly
_RLOO = dataclasses.replace(rloo.REGIME, check=_check_online("rloo"))
_GRPO = dataclasses.replace(grpo.REGIME, check=_check_online("grpo"))

REGIMES: dict[str, Stage] = {
    **regimes(_FEEDME, "sft", "sft-k16", "sft-r3"),  # FeedME, and its ladder (more samples per prompt, rounds)
    "bok": Stage("bok", bok.make_bok, section="ratings", recipe="bok", consumes=(BASE,), produces="sampler",
                 group=SELECTION, rating_budget=lambda cfg: 0),
    **regimes(_PPO, "kl0", "kl0.01", "kl0.1", "kl1", "klauto", "ent0.01", "kl0.1-ent0.01"),
    **regimes(dpo.REGIME, "dpo0.1", "dpo0.5", "ipo0.1"),
    **regimes(_RLOO, "rloo-kl0.1"),
    **regimes(_GRPO, "grpo"),
    # FeedME's finite-sample control: as many base samples per prompt, chosen at random (sft.select=random)
    "sft-random": dataclasses.replace(_FEEDME, name="sft-random", recipe="sft-random", control_of="sft"),
}
KINDS = {"sft": _FEEDME, "ppo": _PPO, "dpo": dpo.REGIME, "rloo": _RLOO, "grpo": _GRPO}  # the regime files' templates, for their entry points (train/<kind>.py)
CONTROLS = {r.control_of: name for name, r in REGIMES.items() if r.control_of}  # regime -> its control

# regimes that bring their own config section: their schemas join the lab's (collapse_lab/config.py)
extend_schema({s.section: s.schema for s in REGIMES.values() if s.schema},
              {k: v for s in REGIMES.values() for k, v in s.ranges.items()},
              {k: v for s in REGIMES.values() for k, v in s.choices.items()})


def stage(name: str) -> Stage:
    """A regime or an upstream stage by name; ConfigError naming the valid ones."""
    found = REGIMES.get(name) or UPSTREAM.get(name) or KINDS.get(name)
    if found is None:
        raise ConfigError(f"unknown stage '{name}'; valid choices: {', '.join([*UPSTREAM, *KINDS, *REGIMES])}")
    return found


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
    """What an entry point does: check the whole plan, resolve the upstream stages, then run the stage itself."""
    check_plan(cfg, name)
    resolve(cfg, name)
    return Path(stage(name).train(cfg, named=named))


def planned_budget(cfg: DictConfig, name: str) -> int:
    """The samples the rater will score for stage `name` under `cfg` (before running it)."""
    s = stage(name)
    if s.rating_budget is None:
        raise ConfigError(f"stage '{name}' declares no rating budget")
    return int(s.rating_budget(cfg))
