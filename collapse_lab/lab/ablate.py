"""`collapse-lab ablate`: the lab's main job, one matched ablation from the base to the report.

    1. base          pretrain.resolve_base: ONE base for every regime and seed (the KL reference)
    2. ratings       per replicate seed: k base samples per training prompt, scored by the gold rater
    3. reward model  per replicate seed: trained on those ratings (online RL's reward: the matched budget)
                     (2-3: the upstream stages the listed regimes consume, as the registry declares them)
    4. regimes       every regime x every seed, through the ONE table collapse_lab/regimes/registry.py (name ->
                     recipe, train function, what it consumes, its group and budget), and (controls=true)
                     each listed regime's control right after it: sft -> sft-random
    5. evaluator     the shared evaluator on the base and on every result (reference: the base),
                     plus the mean gold reward of samples on the seed prompts
    6. report        collapse_lab.lab.report.build(ablation dir): report.md, report.json, plots/*.png

Every stage is the stage's own function with `named=False`, so its directory is the global,
content-addressed cache `checkpoints/<stage>/<name>-<hash>`: a finished stage with an unchanged
config is reused (by this ablation, a later one, or a standalone `train/ppo.py` run with the same
config), an interrupted one resumes. The ablation's own directory, `checkpoints/ablations/<name>/`,
holds what the report needs, COPIED there (each stage's manifest.json, config.yaml, metrics.jsonl;
the evaluator's JSON), so `collapse-lab report <dir>` regenerates the report from that directory
alone, even after the stage cache is cleared.

Replicate seed s sets `seed=s` (the regime's training seed: sampling, minibatches, init of heads)
and `ratings.seed=s` (which base samples get rated, and the rater's noise), so the interval across
seeds covers everything downstream of the base. The base is shared: the post compares two
fine-tunes of ONE davinci, and a fresh base per seed would mix base-to-base variation into the
comparison (run the ablation twice with pretrain.seed=... for that).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import multiprocessing
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
from contextlib import ExitStack
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from collapse_lab.regimes import registry
from collapse_lab.lab import report
from collapse_lab.core import tracking
from collapse_lab.core.console import quiet_stages, say
from collapse_lab.core.checkpoint import lock_run, read_manifest, unlock_run
from collapse_lab.core.config import (SEED, AblateConfig, ConfigError, EvalConfig, check_name, check_output, compose,
                                      group_options, quiet_libraries, read_record, rerun_repair)
from collapse_lab.evaluation.evaluator import Loaded
from collapse_lab.evaluation.evaluator import run as run_evaluator
from collapse_lab.evaluation.frontier import Curve
from collapse_lab.models.models import check_base
from collapse_lab.core.orphans import die_with_parent, spawning_workers
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.stages.reward_model import reward_model_answer_scores
from collapse_lab.regimes.registry import CONTROLS, REGIMES, UPSTREAM
from collapse_lab.stages.stage import BASE, ONLINE, device, flush_denormals, get_dotted
from collapse_lab.core.suites import SuiteError, load_suite
from collapse_lab.models.tokenizer import decode_continuations, encode_texts
from collapse_lab.world.world import make_world

STAGE = "ablations"
PREFERENCE_ALIAS = ("world.preference", "world.rater.preference_strength")
# Lab keys the ablation sets itself, per stage: giving them on the command line is an error.
OWNED_LAB_KEYS = {"recipe": "the recipe is set per regime: use regimes=[...]",
                  "base_path": "the ablation's base is the lab's base for model=/pretrain.* (resolve_base)"}


# ---------------------------------------------------------------- the registry (collapse_lab/regimes/registry.py)


def load_stage(name: str) -> Callable:
    """The train function of a stage or regime by name (the registry's): fn(cfg, named=False) -> directory."""
    return registry.stage(name).train


def preset_overrides(lab: dict, prefix: str = "") -> list[str]:
    """A preset's `lab:` mapping (nested, as in the lab's own YAML) as the overrides that compose it:
    {ppo: {steps: 10}, model: tiny} -> ["ppo.steps=10", "model=tiny"] (a group's option is a plain value)."""
    out = []
    for key, value in lab.items():
        if isinstance(value, dict):
            out += preset_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_override_value(value)}")
    return out


def _override_value(value) -> str:
    """A YAML value as Hydra's override grammar writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w.\-/]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


# --------------------------------------------------------------------------- configuration


@dataclass
class Plan:
    """A validated ablation: its config, the lab overrides every stage gets, and its directory."""

    cfg: DictConfig  # AblateConfig
    lab: list[str]  # the preset's lab mapping as overrides + the command line's lab overrides
    cli_lab: list[str] = dataclasses.field(default_factory=list)  # the command line's alone
    base: Optional[str] = None  # set once resolved: every later stage gets base_path=<it>

    @property
    def regimes(self) -> list[str]:
        """The listed regimes, each followed (controls=true) by its control unless that is listed too."""
        listed = list(self.cfg.regimes)
        extra = lambda r: [CONTROLS[r]] if self.cfg.controls and r in CONTROLS and CONTROLS[r] not in listed else []
        return [x for r in listed for x in [r, *extra(r)]]

    @property
    def seeds(self) -> list[int]:
        return list(range(self.cfg.seed, self.cfg.seed + self.cfg.seeds))

    def lab_overrides(self, seed: Optional[int] = None, regime: Optional[str] = None) -> list[str]:
        """The overrides of one stage: common ones, then its seed, then its recipe. An online regime's
        reward is the reward model trained on the seed's ratings (reward=rm: FeedME's rating budget),
        unless the preset or the command line says otherwise (reward=gold)."""
        o = [f"checkpoints_dir={self.cfg.checkpoints_dir}", "reward=rm", *self.lab]
        if self.base is not None:
            o.append(f"base_path={self.base}")
        if seed is not None:
            o += [f"seed={seed}", f"ratings.seed={seed}"]
        if regime is not None:
            o.append(f"recipe={REGIMES[regime].recipe}")
        return o

    def lab_config(self, seed: Optional[int] = None, regime: Optional[str] = None) -> DictConfig:
        return compose("lab", self.lab_overrides(seed, regime))

    @property
    def jobs(self) -> int:
        """Worker processes for the stages after the base (`jobs`; null: 2 on a machine with 2+ CPU cores
        and no GPU, else 1)."""
        if self.cfg.jobs is not None:
            return int(self.cfg.jobs)
        return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))

    @property
    def digest(self) -> str:
        """8 hex digits over what decides the results (not the name, the checkpoints_dir or the jobs)."""
        c = OmegaConf.to_container(self.cfg, resolve=True)
        c.pop("name"), c.pop("checkpoints_dir"), c.pop("jobs"), c.pop("verbose")
        text = json.dumps({"ablate": c, "lab": self.lab}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def out(self) -> Path:
        name = self.cfg.name or f"{self.cfg.preset}-{self.digest}"
        check_name(name, "ablation name")
        return Path(self.cfg.checkpoints_dir) / STAGE / name


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(ablate overrides, lab overrides). A key whose first part is an AblateConfig field is the
    ablation's; `world.preference=X` becomes `world.rater.preference_strength=X`; the rest are
    lab overrides (model=, world.*, ppo.*, sft.*, ratings.*, ...), checked by the lab's schema."""
    fields = {f.name for f in dataclasses.fields(AblateConfig)}
    ablate, lab = [], []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got '{arg}'")
        key, value = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare == PREFERENCE_ALIAS[0]:
            lab.append(f"{PREFERENCE_ALIAS[1]}={value}")
        elif bare.split(".")[0] in fields:
            ablate.append(arg)
        elif bare in OWNED_LAB_KEYS:
            raise ConfigError(f"'{bare}' cannot be given to ablate: {OWNED_LAB_KEYS[bare]}")
        else:
            lab.append(arg)
    return ablate, lab


def plan(argv: list[str]) -> Plan:
    """Parse and validate everything before any work: ConfigError (one line) on bad input."""
    ablate, lab = split_overrides(argv)
    model = next((a.split("=", 1)[1] for a in lab if a.split("=", 1)[0] == "model"), None)
    if model in group_options("preset") and not any(a.split("=", 1)[0] == "preset" for a in ablate):
        ablate.insert(0, f"preset={model}")  # a model with a preset of its own size (recipes/preset/<model>.yaml)
    for arg in ablate:
        if arg.lstrip("+~").startswith("lab.") or arg.lstrip("+~").startswith("lab="):
            raise ConfigError(f"'{arg}': give lab overrides as plain key=value (model=..., ppo.steps=...)")
        key, value = arg.split("=", 1)
        if key == "preset" and value not in group_options("preset"):
            raise ConfigError(f"unknown preset '{value}'; valid choices: {', '.join(group_options('preset'))}")
    cfg = compose("ablate", ablate)
    bad = [r for r in cfg.regimes if r not in REGIMES]
    if bad or not cfg.regimes:
        raise ConfigError(f"unknown regime(s) {bad or '(none given)'} in regimes; valid choices: {', '.join(REGIMES)}")
    if len(set(cfg.regimes)) != len(cfg.regimes):
        raise ConfigError(f"regimes lists a regime twice: {list(cfg.regimes)}")
    missing = [r for r in cfg.regimes if REGIMES[r].recipe not in group_options("recipe")]
    if missing:
        raise ConfigError(f"regime(s) {missing} have no recipe in recipes/recipe/ yet; "
                          f"available recipes: {', '.join(group_options('recipe'))}")
    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
    if cfg.seed + cfg.seeds - 1 > SEED.high:
        raise ConfigError(f"seed + seeds - 1 = {cfg.seed + cfg.seeds - 1}: the replicate seeds must be {SEED}")
    if not 0 < cfg.collapse.confidence < 1:
        raise ConfigError(f"collapse.confidence must be in (0, 1), got {cfg.collapse.confidence}")
    for suite in cfg.eval.suites:
        try:
            load_suite(suite)
        except SuiteError as e:
            raise ConfigError(str(e)) from None
    if "seed" not in cfg.eval.suites:
        raise ConfigError("eval.suites must include 'seed' (the post's prompts: the collapse rule reads them)")
    check_output(Path(cfg.checkpoints_dir), "checkpoints_dir", is_dir=True)
    p = Plan(cfg, [*preset_overrides(OmegaConf.to_container(cfg.lab, resolve=True)), *lab], lab)
    for regime in p.regimes:  # every stage's config composes and passes its checks: a bad value fails here, not mid-run
        registry.check_plan(p.lab_config(p.seeds[-1], regime), regime)
    first = p.lab_config(p.seeds[0], p.regimes[0])
    if first.model.path:  # a user's model: a causal LM with a tokenizer that spells the answers, context enough
        tokens = max(first.ratings.max_new_tokens, first.ppo.max_new_tokens, cfg.eval.max_new_tokens,
                     cfg.eval.story_max_new_tokens if "stories" in cfg.eval.suites else 0)
        check_base(first.model.path, make_world(first.world), tokens)
    same_ablation(p)
    return p


def same_ablation(p: Plan) -> None:
    """ConfigError unless the ablation's directory holds no ablation.yaml yet or one of this plan's digest:
    checked by `plan` (before any work) and again by `run` once it holds the directory's lock (an ablation
    started at the same moment may have written its own in between)."""
    saved = read_record(p.out / "ablation.yaml", f"repair: rm {p.out / 'ablation.yaml'} and rerun the same "
                                                  "collapse-lab ablate command")
    if saved is not None and saved.get("digest") != p.digest:
        raise ConfigError(f"{p.out} holds an ablation with a different config; choose another name=")


# ------------------------------------------------------------------------------ the pipeline


class Display:
    """The ablation's console (collapse_lab/core/console.py): a line when each stage starts and when it ends, in
    any output, as it happens (stages in worker processes report through a queue); on a terminal, also ONE
    progress bar for the whole run. `lines` and `rss_mib` (each finished stage's) go into the manifest."""

    def __init__(self, total: int):
        self.done, self.total, self.lines, self.rss_mib = 0, total, [], []
        self.lock = threading.Lock()  # this process's task thread reports too
        self.progress = None
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]ablation[/bold] {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(highlight=False), transient=False)
            self.task = self.progress.add_task("", total=total)

    def __enter__(self):
        global _REPORT
        _REPORT = self.event
        self.stack = ExitStack()  # the stages' own bars and lines (their workers' too) would interleave with these
        self.stack.enter_context(quiet_stages())
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        global _REPORT
        _REPORT = None
        self.stack.close()
        if self.progress is not None:
            self.progress.stop()

    def stage(self, label: str, fn: Callable):
        """Run one stage in this process: fn() -> (result, summary); its lines; its result."""
        return _timed(label, fn)

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, soft_wrap=True)
        else:
            say(line)

    def event(self, event: tuple) -> None:
        """A stage started (("start", label)) or ended (("end", label, summary, seconds, rss_mib)), in this
        process or, passed on by `Workers`, in a worker process."""
        with self.lock:
            if event[0] == "start":
                self.say(f"[{self.done}/{self.total}] start {event[1]}")
                return
            _, label, summary, seconds, rss_mib = event
            self.rss_mib.append(rss_mib)
            self.done += 1
            line = f"[{self.done}/{self.total}] {label}: {summary} ({seconds:.1f} s)"
            self.lines.append(line)
            self.say(line)
            if self.progress is not None:
                self.progress.update(self.task, description=label, completed=self.done)


# Where this process reports a stage's start and end: the Display's `event` in the ablation's process, the
# queue to it in a worker process (_worker_init), nowhere otherwise.
_REPORT: Optional[Callable[[tuple], None]] = None


def _timed(label: str, fn: Callable):
    """fn() -> (result, summary), reported when it starts and when it ends (summary, seconds, the RSS after
    it in MiB); returns the result."""
    if _REPORT is not None:
        _REPORT(("start", label))
    start = time.time()
    result, summary = fn()
    seconds = time.time() - start
    gc.collect()  # the stage's models, optimiser and trainer (reference cycles): memory stays flat across stages
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _REPORT is not None:
        _REPORT(("end", label, summary, seconds, _rss_mib()))
    return result


class Workers:
    """Where the stages after the base run: with jobs=N > 1, in a thread of THIS process and in N − 1 spawned
    worker processes, the torch threads split between all N (torch on 2 CPU threads runs a tiny model's step
    far below 2x one thread's speed, so two one-thread stages side by side get more done: docs/ablation.md,
    speed and memory; this process takes tasks too, so N processes hold memory, not N + 1). This process's
    main thread only schedules: a task starts the moment a slot is free and its inputs are done. With
    jobs=1, each task runs in this process when it is submitted. A stage's result depends on its config and
    its thread count only (every stage seeds itself), not on which process runs it or when."""

    def __init__(self, jobs: int):
        self.jobs, self.pool, self.queue = jobs, None, []
        self.in_pool: dict[Future, Future] = {}  # a worker process's future -> the caller's future
        self.here: Optional[Future] = None  # the caller's future of the task this process's thread runs
        self.inbox: "queue.SimpleQueue" = queue.SimpleQueue()  # this process's task thread's next task

    def __enter__(self) -> "Workers":
        if self.jobs > 1:
            threads = max(1, torch.get_num_threads() // self.jobs)
            spawning_workers()  # they end with this process, even killed -9 (collapse_lab/core/orphans.py)
            context = multiprocessing.get_context("spawn")
            self.events = context.Queue()  # the workers' stage lines, passed on to this process's _REPORT
            self.pool = ProcessPoolExecutor(self.jobs - 1, mp_context=context,
                                            initializer=_worker_init, initargs=(threads, os.getpid(), self.events))
            # ONE thread for all of this process's tasks (a new thread per task grew the heap: glibc gives
            # threads their own malloc arenas); a daemon: on an error it ends with the process, like a
            # killed stage (which resumes)
            threading.Thread(target=_task_thread, args=(threads, self.inbox), daemon=True, name="ablate-tasks").start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # on an error: queued tasks are dropped, the workers' running ones finish (their stages resume later)
        if self.pool is not None:
            self.queue.clear()
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            if exc_type is None and self.here is not None:
                wait([self.here])
            self.inbox.put(None)
            self._pass_events()

    def submit(self, fn: Callable, *args) -> Future:
        future = Future()
        if self.pool is None:
            _run_into(future, fn, args)
        else:
            self.queue.append((future, fn, args))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Pass finished workers' results on, then start queued tasks on the free slots, in order."""
        for inner in [f for f in self.in_pool if f.done()]:
            future = self.in_pool.pop(inner)
            if inner.exception() is not None:
                future.set_exception(inner.exception())
            else:
                future.set_result(inner.result())
        if self.here is not None and self.here.done():
            self.here = None
        if self.queue and self.here is None:
            self.here, fn, args = self.queue.pop(0)
            self.inbox.put((self.here, fn, args))
        while self.queue and len(self.in_pool) < self.jobs - 1:
            future, fn, args = self.queue.pop(0)
            self.in_pool[self.pool.submit(fn, *args)] = future

    def next_done(self, pending: dict) -> Future:
        """A finished task among `pending` (the first submitted of those finished), scheduling while none is."""
        self._dispatch()
        while not any(f.done() for f in pending):
            wait([*pending, *self.in_pool], return_when=FIRST_COMPLETED, timeout=0.2)
            self._pass_events()
            self._dispatch()
        self._pass_events()
        return next(f for f in pending if f.done())

    def _pass_events(self) -> None:
        """The worker processes' stage lines so far, to this process's console."""
        while self.pool is not None:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if _REPORT is not None:
                _REPORT(event)


def _run_into(future: Future, fn: Callable, args: tuple) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # re-raised by result(), as a worker's would be (SystemExit too: in the task
        future.set_exception(e)  # thread it must reach the scheduler, not leave it waiting)


def _task_thread(threads: int, inbox: "queue.SimpleQueue") -> None:
    """This process's task thread: runs what `Workers` puts in its inbox until None. Torch's thread count and
    the denormal flush are per thread."""
    torch.set_num_threads(threads)
    flush_denormals()
    while (task := inbox.get()) is not None:
        _run_into(*task)


def _worker_init(threads: int, parent: int, events) -> None:
    global _REPORT
    die_with_parent(parent)  # (collapse_lab/__init__.py did so already, before the worker's imports: again, for sure)
    _REPORT = events.put  # this worker's stage lines go to the ablation's process (Workers._pass_events)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the worker's threads are torch's
    quiet_libraries()  # per process: the libraries' own loading and saving bars, as in the ablation's process
    torch.set_num_threads(threads)
    flush_denormals()


# the tasks (module-level: a worker process unpickles them); a regime's returns its run record


def _base_task(p: Plan, base: Path, out: Path) -> None:
    _timed("evaluate base", lambda: _evaluated(evaluate(p, base, base, out / "evals" / "base")))
    _timed("reference curves", lambda: _evaluated([reference_curves(p, base, out / "evals" / "base")]))


def _upstream_task(p: Plan, seed: int, needs: list[str], out: Path) -> None:
    """One replicate's upstream stages (ratings, reward model), in the registry's order."""
    lab = p.lab_config(seed)
    for x in needs:
        path = _timed(f"{x.replace('_', ' ')} s{seed}", lambda: _done(load_stage(x)(lab, named=False)))
        _copy_run(path, out / "runs" / x / f"s{seed}")
        if x == "reward_model":  # its scores on the seed answers: the exact π* of reward=rm regimes (report)
            _write_json(out / "runs" / x / f"s{seed}" / "answer_scores.json",
                        reward_model_answer_scores(str(path), make_world(lab.world), lab.world.curve_suite))


def _regime_task(p: Plan, seed: int, name: str, base: Path, out: Path) -> dict:
    """One regime of one replicate, then the evaluator on it."""
    regime, rcfg = REGIMES[name], p.lab_config(seed, name)
    path = _timed(f"{name} s{seed}", lambda: _done(load_stage(name)(rcfg, named=False)))
    _copy_run(path, out / "runs" / name / f"s{seed}")
    evals = out / "evals" / name / f"s{seed}"
    _timed(f"evaluate {name} s{seed}", lambda: _evaluated(evaluate(p, path, base, evals)))
    lab = OmegaConf.to_container(rcfg, resolve=True)
    # what the report needs of the regime's declaration, stored: the report reads stored results only
    return {"regime": name, "seed": seed, "group": regime.group, "recipe": regime.recipe,
            "control_of": regime.control_of, "path": str(path), "evals": str(evals.relative_to(out)),
            "kl_coef": regime.kl_coef(lab), "adaptive_kl": regime.adaptive_kl(lab),
            "ent_coef": get_dotted(lab, "ppo.ent_coef") if regime.kl_key == "ppo.kl_coef" else None}


def _rss_mib() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far (getrusage; KiB on Linux)."""
    try:
        return round(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    except OSError:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _stage_summary(path: Path) -> str:
    m = read_manifest(path) or {}
    bits = [str(path), m.get("status", "?")]
    for key in ("steps", "samples_scored"):
        if m.get(key) is not None:
            bits.append(f"{key}={m[key]}")
    return ", ".join(bits)


def run(p: Plan) -> Path:
    """Run (or resume, or find finished) every stage of the plan, then write the report. Bad input found on the
    way (a damaged stage run, say) ends the ablation with manifest status failed, not running."""
    lock_run(p.out)  # a second identical ablation waits, then finds every stage finished
    try:
        same_ablation(p)  # under the lock: a different ablation that held it may have taken the directory
    except ConfigError:
        unlock_run(p.out)
        raise
    try:
        return _run(p)
    except ConfigError as e:
        if (read_manifest(p.out) or {}).get("status") == "running":
            _write_json(p.out / "manifest.json", {**read_manifest(p.out), "status": "failed", "error": str(e)})
        unlock_run(p.out)
        raise


def _run(p: Plan) -> Path:
    cfg, out = p.cfg, p.out
    flush_denormals()  # before anything computes (stage.flush_denormals)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"digest": p.digest, "ablate": OmegaConf.to_container(cfg, resolve=True),
                                     "lab": p.lab}), out / "ablation.yaml")
    previous = read_manifest(out) or {}
    _write_json(out / "manifest.json", {**previous, "stage": STAGE, "status": "running",
                                        "started_at": previous.get("started_at", _now())})
    n_seeds = len(p.seeds)
    # the upstream stages each seed needs (ratings, reward model: what the listed regimes consume), in order
    needs = [x for x in UPSTREAM if x != BASE and any(x in registry.upstream(p.lab_config(p.seeds[0], r), r)
                                                      for r in p.regimes)]
    total = 3 + len(needs) * n_seeds + len(p.regimes) * n_seeds * 2 + 1
    with Display(total) as show:
        # 1. the base (shared by every seed)
        base = Path(show.stage("base", lambda: _done(Path(resolve_base(p.lab_config())))))
        p.base = str(base)  # explicit from here on: every stage and seed starts from THIS base
        _copy_run(base, out / "runs" / "base")
        # 2-5 in `jobs` worker processes: the base's evaluation and reference curves; per seed its upstream
        # stages (ratings, reward model), then each regime (training and the evaluator) once they are done
        with Workers(p.jobs) as pool:
            pending = {pool.submit(_base_task, p, base, out): None}
            pending.update({pool.submit(_upstream_task, p, seed, needs, out): seed for seed in p.seeds})
            records = []
            while pending:
                future = pool.next_done(pending)
                seed = pending.pop(future)
                record = future.result()
                if record is not None:
                    records.append(record)
                if seed is not None:  # a seed's upstream stages are done: its regimes may start, online RL first
                    first = sorted(p.regimes, key=lambda r: REGIMES[r].group != ONLINE)  # (the longest: a short tail)
                    pending.update({pool.submit(_regime_task, p, seed, name, base, out): None for name in first})
        order = {(s, r): i for i, (s, r) in enumerate((s, r) for s in p.seeds for r in p.regimes)}
        runs = sorted(records, key=lambda x: order[x["seed"], x["regime"]])
        _write_json(out / "runs.json", {"base": str(base), "runs": runs})
        # 6. the report
        result = show.stage("report", lambda: (report.build(out), f"{out / 'report.md'}"))
    _write_json(out / "manifest.json", {**(read_manifest(out) or {}), "status": "finished",
                                        "finished_at": _now(), "wall_time_s": time.time() - started,
                                        "stages": show.lines, "rss_mib": show.rss_mib, "jobs": p.jobs})
    unlock_run(out)
    print(result["verdict"]["text"])
    _log_to_wandb(p, out, result)
    return out


def _done(path) -> tuple[Path, str]:
    return Path(path), _stage_summary(Path(path))


def _evaluated(files: list[Path]) -> tuple[list[Path], str]:
    return files, ", ".join(str(f) for f in files)


# ------------------------------------------------------------------------------ evaluation


def evaluate(p: Plan, model: Path, base: Path, out: Path) -> list[Path]:
    """The shared evaluator on `model` (reference: the base) for each suite, and the gold reward.

    Skipped when out/stamp.json shows this model's finished manifest and these eval settings
    were evaluated already (a re-run of a finished ablation only re-writes the report).
    """
    e = p.cfg.eval
    stamp = {"model": str(model), "manifest": read_manifest(model), "base": str(base),
             "eval": OmegaConf.to_container(e, resolve=True)}
    files = [out / f"{s}.json" for s in e.suites] + [out / "gold.json"]
    if _read_json(out / "stamp.json") == json.loads(json.dumps(stamp)) and all(f.exists() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    common = compose("evaluate", [f"model_path={_override_value(str(model))}", f"reference_path={_override_value(str(base))}",
                                  f"sampling.temperature={e.temperature}",
                                  f"seed={e.seed}", "plots=false", f"verbose={p.cfg.verbose}"])  # the report draws its own
    try:
        for suite in e.suites:
            cfg = copy.deepcopy(common)
            cfg.suite, cfg.out = suite, str(out / f"{suite}.json")
            cfg.sampling.n = 0 if suite in ("arithmetic", "templates") else e.samples  # calibration, trained-on: exact only
            cfg.sampling.max_new_tokens = e.story_max_new_tokens if suite == "stories" else e.max_new_tokens
            run_evaluator(cfg, _LOADED)
        _write_json(out / "gold.json", gold_reward(p, model))
    finally:
        _LOADED.forget(keep=str(base))
    _write_json(out / "stamp.json", stamp)
    return files


# Per process: the base, loaded once, with its answer distributions on every suite's prompts (the reference of
# every evaluation); a model under evaluation is loaded once for all its suites and released after.
_LOADED = Loaded()


def reference_curves(p: Plan, base: Path, out: Path) -> Path:
    """out/reference_curves.json: the frontier's exact reference curves of the base on the seed prompts,
    best-of-k for k in frontier.BEST_OF and the KL-regularised optimum π*_β for β in frontier.BETAS
    (collapse_lab/evaluation/frontier.py); {} for a world without the seed prompts."""
    path = out / "reference_curves.json"
    model, tokenizer = _LOADED.load(str(base), device(), "float32")
    curve = Curve(model, tokenizer, make_world(p.lab_config().world))
    _write_json(path, curve.reference_curves() if curve else {})
    return path


def gold_reward(p: Plan, model_path: Path) -> dict:
    """Mean NOISELESS gold score (world.rater.expected) of `eval.gold_samples` samples per seed
    prompt at `eval.temperature`: what the post's raters would give the regime on its prompts.
    A completion cut at eval.max_new_tokens counts as not ended (the rater's rule). For best-of-k
    each sample is the best-scored of k base samples (the policy itself, by the same scores)."""
    e = p.cfg.eval
    world = make_world(p.lab_config().world)
    k = 1  # a best-of-k directory (collapse_lab/regimes/bok.py): k base samples per query, the best-scored kept
    spec = read_record(model_path / "bok.json", rerun_repair(model_path))
    if spec is not None:
        model_path, k = Path(spec["base_path"]), int(spec["k"])
    model, tokenizer = _LOADED.load(str(model_path), device(), "float32")
    per_prompt = {}
    for prompt in world.seed_prompts:  # at the seed suite's settings, these are its samples (drawn once)
        s = _LOADED.sample(model, tokenizer, prompt.text, e.gold_samples * k, e.temperature, e.max_new_tokens,
                           EvalConfig.batch_size, e.seed)
        eos = tokenizer.eos_token_id
        texts = decode_continuations(tokenizer, encode_texts(tokenizer, [prompt.text]) * len(s.tokens),
                                     [[t for t in y if t != eos] for y in s.tokens])
        scores = np.array([world.rater.expected(prompt, t, bool(f)) for t, f in zip(texts, s.finished)])
        per_prompt[prompt.id.removeprefix("seed/")] = float(scores.reshape(e.gold_samples, k).max(1).mean())
    return {"per_prompt": per_prompt, "mean": float(np.mean(list(per_prompt.values()))),
            "n": e.gold_samples, "best_of": k, "temperature": e.temperature, "max_new_tokens": e.max_new_tokens,
            "preference_strength": float(world.cfg.rater.preference_strength) if hasattr(world.cfg, "rater") else None}


# ------------------------------------------------------------------------------------ files


def _copy_run(src: Path, dst: Path) -> None:
    """The files of a stage's run directory the report reads (not the weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "config.yaml", "metrics.jsonl", "spec.json", "bok.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _read_json(path: Path):
    """A cache file of the ablation (an evaluation's stamp.json): a damaged one is no stamp, and the evaluation
    is redone (which rewrites it)."""
    try:
        return read_record(path, "")
    except ConfigError:
        return None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log_to_wandb(p: Plan, out: Path, result: dict) -> None:
    """One W&B run per ablation (job_type 'ablate') with the report's per-regime numbers as its
    summary: what `collapse-lab sweep` groups, and `wandb sync` uploads. Its mode: the command
    line's wandb.mode, else $WANDB_MODE, else offline (the presets silence only the per-stage runs)."""
    given = [o.split("=", 1)[1] for o in p.cli_lab if o.startswith("wandb.mode=")]
    mode = given[-1] if given else os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return
    lab = compose("lab", [*p.lab_overrides(), f"wandb.mode={mode}"])
    run = tracking.init(lab, out, job_type="ablate")
    if run is None:
        return
    run.summary.update(flat_summary(result))
    tracking.finish()


def flat_summary(result: dict) -> dict[str, float]:
    """{'<regime>/<metric>': mean} of the report's scalar per-regime numbers, and 'collapsed' (1 / 0,
    and 0.5 for inconclusive) for every judged regime (controls are shown, not judged)."""
    flat = {}
    for name, r in result["regimes"].items():
        for key, stat in r["metrics"].items():
            if isinstance(stat, dict) and isinstance(stat.get("mean"), (int, float)):
                flat[f"{name}/{key}"] = stat["mean"]
        if not r.get("control_of"):
            flat[f"{name}/collapsed"] = 0.5 if r.get("call") == "inconclusive" else float(bool(r["collapsed"]))
    return flat


def main(argv: list[str]) -> Path:
    return run(plan(argv))
