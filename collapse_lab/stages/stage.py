"""The stage interface: what every stage and regime declares (`Stage`, the registry's entries:
collapse_lab/regimes/registry.py), and the bookkeeping every stage shares, in ONE place:

    with run_stage(cfg, out, STAGE, "{steps} steps") as run:    # lock; finished already? (run.done)
        if run.done:
            return out
        run.start(base_path=base)                               # config.yaml, manifest "running", W&B
        ...                                                     # the stage's own work
        run.finish(samples_scored=n, steps=s)                   # manifest "finished": counters, wall
    return out                                                  #   time, git commit, package versions

plus the HF TrainingArguments every Trainer-based stage builds (`hf_args`), the device, and the
denormal flush (`flush_denormals`). A stage's update rule stays in its own file.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from omegaconf import DictConfig

from collapse_lab.core import tracking
from collapse_lab.core.console import progress_bars
from collapse_lab.models.models import default_device, trainer_precision
from collapse_lab.core.checkpoint import (already_finished, git_commit, package_versions, publish, read_manifest,
                                     run_files, start_run, write_manifest)
from collapse_lab.core.config import ConfigError, same_config
from collapse_lab.core.distributed import is_main_process

# the names a stage declares (re-exported: the regimes import them with the Stage)
from collapse_lab.core.names import (BASE, OFFLINE, ONLINE, POLICY, RATINGS, REWARD, REWARD_MODEL,  # noqa: E402,F401
                                     SELECTION, get_dotted)


@dataclass(frozen=True)
class Stage:
    """One stage or regime: everything the orchestrator, the budget and the report need to know.

    train(cfg, named=False) -> its run directory (found finished, resumed, or run).
    rating_budget(cfg) -> the samples the rater scores for it (its matched budget), before running.
    """

    name: str
    train: Callable[..., Path]
    section: Optional[str] = None  # its own config section (cfg.<section>)
    schema: Optional[type] = None  # a regime's section: the dataclass in its module (fields' ranges: config.ranged)
    recipe: Optional[str] = None  # recipes/recipe/<recipe>.yaml (regimes only)
    consumes: tuple[str, ...] = ()  # of BASE, RATINGS, REWARD_MODEL, REWARD, POLICY
    produces: str = POLICY
    group: Optional[str] = None  # OFFLINE | ONLINE | SELECTION (regimes only)
    rating_budget: Optional[Callable[[DictConfig], int]] = None
    control_of: Optional[str] = None  # a control: the regime whose collapse call also needs a drop below it
    # check(cfg): ConfigError when the config cannot run (batch arithmetic, constraints across keys); no work.
    # Every stage of a plan is checked before its first one runs (registry.check_plan)
    check: Optional[Callable[[DictConfig], None]] = None
    kl_key: Optional[str] = None  # the config key holding its KL coefficient β (None: no KL to the base)
    adaptive_kl_key: Optional[str] = None
    seeded: bool = True  # False: a function of its inputs alone (best-of-k): `seed` is not in its keys
    reads: tuple[str, ...] = ()  # config keys outside its section and its inputs' that it depends on

    def needs(self, cfg: DictConfig) -> tuple[str, ...]:
        """What this run consumes under `cfg`: REWARD resolves to REWARD_MODEL (and its ratings) when
        cfg.reward == 'rm' without a given reward_model_path, to nothing otherwise."""
        out = []
        for x in self.consumes:
            if x == REWARD:
                if cfg.reward == "rm" and not cfg.reward_model_path:
                    out += [RATINGS, REWARD_MODEL]
            else:
                out.append(x)
        return tuple(dict.fromkeys(out))

    def keys(self, cfg: DictConfig) -> tuple[str, ...]:
        """What a run of this stage depends on under `cfg` (the config keys hashed into its run directory's
        name), derived from the declaration: the world; the base (its path or preset, and the pretraining
        config of the lab's own base) when it consumes BASE; the seed (unless not seeded); the ratings'
        section (RATINGS); for REWARD `reward` and, with reward=rm, the reward model's path or its ratings'
        and training sections; its own section and `reads`; for a policy its LoRA and curve settings, for a
        reward model its LoRA settings when it trains an adapter."""
        keys = ["world"]
        for x in self.consumes:
            if x == BASE:
                keys += ["base_path", "model"] + ([] if cfg.base_path or cfg.model.path else ["pretrain"])
            elif x == RATINGS:
                keys.append("ratings")
            elif x == REWARD_MODEL:
                keys.append("reward_model")
            elif x == REWARD:
                keys.append("reward")
                if cfg.reward == "rm":
                    keys += ["reward_model_path"] if cfg.reward_model_path else ["ratings", "reward_model"]
        keys += (["seed"] if self.seeded else []) + ([self.section] if self.section else []) + list(self.reads)
        keys += ["peft", "curve"] if self.produces == POLICY else []
        keys += ["peft"] if self.produces == REWARD_MODEL and cfg.peft.enabled else []  # LoRA: another reward model
        return tuple(dict.fromkeys(keys))

    def kl_coef(self, lab: dict) -> Optional[float]:
        return get_dotted(lab, self.kl_key) if self.kl_key else None

    def adaptive_kl(self, lab: dict) -> bool:
        return bool(get_dotted(lab, self.adaptive_kl_key)) if self.adaptive_kl_key else False


def ratings_budget(cfg: DictConfig) -> int:
    """The ratings stage's n·k: FeedME's budget, and every regime's that learns from those ratings."""
    return cfg.ratings.prompts * cfg.ratings.samples_per_prompt


def online_rating_budget(section: str) -> Callable[[DictConfig], int]:
    """An online regime's ratings: the reward model's training ratings (reward=rm: FeedME's n·k), or
    every rollout the gold rater scores (reward=gold: <section>.steps x <section>.rollout_batch_size)."""
    def budget(cfg: DictConfig) -> int:
        s = cfg[section]
        return ratings_budget(cfg) if cfg.reward == "rm" else s.steps * s.rollout_batch_size
    return budget


# ------------------------------------------------------------------------------- bookkeeping


class Run:
    """A stage's run directory while it runs: `done` (found finished), `start`, `finish`."""

    def __init__(self, cfg: DictConfig, out: Path, stage: str, track: bool):
        self.cfg, self.out, self.stage, self.track = cfg, Path(out), stage, track
        self.done, self.finished, self.started = False, False, time.time()
        self.previous: dict = {}

    def start(self, resume: bool = False, **fields) -> None:
        """config.yaml and manifest.json (status running, `fields`); resume=True keeps an interrupted
        run's manifest (its counters, wall time) underneath. Then the W&B run (main process only)."""
        self.previous = (read_manifest(self.out) or {}) if resume else {}
        self.started = time.time()
        if is_main_process():
            start_run(self.cfg, self.out, self.stage, self.previous, **fields)
        if self.track:
            tracking.init(self.cfg, self.out, job_type=self.stage)

    def finish(self, **fields) -> None:
        """manifest.json with status finished: `fields` (budget counters ...) over what start wrote, the
        wall time (an interrupted run's earlier wall time included), git commit and package versions."""
        if is_main_process():
            wall = self.previous.get("wall_time_s", 0.0) + time.time() - self.started
            write_manifest(self.out, {**(read_manifest(self.out) or {}), "status": "finished", "wall_time_s": wall,
                                      "files": run_files(self.out), **fields, "git_commit": git_commit(),
                                      "versions": package_versions()})
        self.finished = True


@contextmanager
def run_stage(cfg: DictConfig, out: Path, stage: str, summary: str, track: bool = True) -> Iterator[Run]:
    """The one prologue/epilogue of every stage (module docstring). `summary` formats the finished
    manifest for the "already finished" line. Leaving the block without `finish` (a kill, an exception)
    leaves the manifest at "running": the next run resumes or redoes the stage; bad input found after the
    run started (a ConfigError) sets it to "failed", with the error."""
    flush_denormals()
    run = Run(cfg, out, stage, track)
    run.done = already_finished(out, summary, check=lambda: same_config(cfg, out))  # compared under the lock
    try:
        yield run
    except ConfigError as e:  # bad input found once the run had started: the run ended, it is not "running"
        if is_main_process() and (run.out / "manifest.json").exists():
            write_manifest(run.out, {**(read_manifest(run.out) or {}), "status": "failed", "error": str(e)})
        raise
    finally:
        if run.track and not run.done:
            tracking.finish()


def stage_function(stage: str, directory: Callable[[DictConfig, bool], Path], summary: str,
                   check: Optional[Callable[[DictConfig], None]] = None, track: bool = True):
    """A stage's body `body(cfg, run)` as the stage's train function `fn(cfg, named=True) -> its directory`:
    `check(cfg)` before anything, `directory(cfg, named)`, then the body inside `run_stage` unless the run is
    found finished (`run.out` is the directory). The decorated stages' bookkeeping, in this one place."""
    def wrap(body: Callable[[DictConfig, Run], None]) -> Callable[..., Path]:
        @functools.wraps(body)
        def train(cfg: DictConfig, named: bool = True) -> Path:
            if check is not None:
                check(cfg)
            out = directory(cfg, named)
            with run_stage(cfg, out, stage, summary, track) as run:
                if not run.done:
                    body(cfg, run)
            return out
        return train
    return wrap


def flush_denormals() -> None:
    """Subnormal floats take a slow path on x86 CPUs: once small activations/gradients go subnormal a
    training step got ~90x slower (measured: 0.03 s -> 2.8 s on a tiny model). Flushing them to zero
    changes results by < 1e-38 per value. The setting is per thread and torch's worker threads copy it
    when they start: every stage calls this before it computes (run_stage), the CLI before any stage."""
    torch.set_flush_denormal(True)


def device() -> str:
    """This process's device, accelerate's (cuda:<local rank> under a launcher, else the GPU or CPU)."""
    return str(default_device())


def save_policy(out: Path, model, tokenizer, log: list[dict]) -> None:
    """Publish a trained policy into its run directory (HF-loadable weights, tokenizer, the trainer's log as
    metrics.jsonl), then drop the trainer's scratch directory out/trainer."""
    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))

    publish(out, save)
    shutil.rmtree(Path(out) / "trainer", ignore_errors=True)


def hf_args(cls, cfg: DictConfig, out: Path, *, seed: int, lr: float, batch_size: int, **kw):
    """The HF TrainingArguments (or a TRL subclass: SFTConfig, RewardConfig, DPOConfig, RLOOConfig,
    GRPOConfig) of a stage, built in ONE place: the trainer's scratch directory out/trainer (removed
    once the stage has published), W&B per the lab's config, the device, no pinned memory, a progress
    bar only on a terminal, no mixed precision; `kw` is the stage's own (epochs or max_steps, schedule, loss options)."""
    base = dict(output_dir=str(Path(out) / "trainer"), learning_rate=lr, per_device_train_batch_size=batch_size,
                save_strategy="no", report_to=tracking.report_to(cfg), run_name=Path(out).name, seed=seed,
                data_seed=seed, use_cpu=device() == "cpu", dataloader_pin_memory=False,
                disable_tqdm=not progress_bars(),
                # TRL's configs turn activation checkpointing on by default through its deprecated name
                # (`gradient_checkpointing`, a FutureWarning per stage); the lab's models are small: off, by its new name
                activation_checkpointing=False,
                # the config's mixed precision, never the library's default (TRL's configs: bf16 autocast, on
                # CPUs too, ~7x slower there, and left in accelerate's process-wide state for the next stage)
                **trainer_precision(cfg))
    return cls(**{**base, **kw})
