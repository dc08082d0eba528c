"""`collapse-lab ablate`: the lab's main job, one matched ablation from the base to the report.

    1. base          pretrain.resolve_base: ONE base for every regime and seed (the KL reference)
    2. ratings       per replicate seed: k base samples per training prompt, scored by the gold rater
    3. reward model  per replicate seed: trained on those ratings (PPO's reward: the matched budget)
    4. regimes       every regime x every seed, through the ONE table `REGIMES` (name -> recipe, stage),
                     and (controls=true) each listed regime's control right after it: sft -> sft-random
    5. evaluator     the shared evaluator on the base and on every result (reference: the base),
                     plus the mean gold reward of samples on the seed prompts
    6. report        collapse_lab.report.build(ablation dir): report.md, report.json, plots/*.png

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

import dataclasses
import gc
import hashlib
import importlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from collapse_lab.checkpoint import lock_run, unlock_run
from collapse_lab.config import AblateConfig, ConfigError, compose, group_options

STAGE = "ablations"
PREFERENCE_ALIAS = ("world.preference", "world.rater.preference_strength")
# Lab keys the ablation sets itself, per stage: giving them on the command line is an error.
OWNED_LAB_KEYS = {"recipe": "the recipe is set per regime: use regimes=[...]",
                  "base_path": "the ablation's base is the lab's base for model=/pretrain.* (resolve_base)"}


# ------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Regime:
    """A regime: its recipe (recipes/recipe/<recipe>.yaml) and its stage function
    ("module:function", called as fn(cfg, named=False) -> run directory)."""

    recipe: str
    stage: str
    family: str  # "feedme" (trains on the ratings) | "ppo" (trains on the reward model)
    control_of: str | None = None  # a control: the regime whose collapse call also needs a drop below it

    def function(self) -> Callable:
        return load_stage(self.stage)


_PPO = "collapse_lab.ppo:train_ppo"
REGIMES: dict[str, Regime] = {
    "sft": Regime("sft", "collapse_lab.sft:train_sft", "feedme"),
    "bok": Regime("bok", "collapse_lab.bok:make_bok", "feedme"),
    **{name: Regime(name, _PPO, "ppo")
       for name in ("kl0", "kl0.01", "kl0.1", "kl1", "klauto", "ent0.01", "kl0.1-ent0.01")},
    # FeedME's finite-sample control: as many base samples per prompt, chosen at random (sft.select=random)
    "sft-random": Regime("sft-random", "collapse_lab.sft:train_sft", "feedme", control_of="sft"),
}
CONTROLS = {r.control_of: name for name, r in REGIMES.items() if r.control_of}  # regime -> its control
RATINGS = "collapse_lab.ratings:rate"
REWARD_MODEL = "collapse_lab.reward_model:train_reward_model"


def load_stage(spec: str) -> Callable:
    """'module:function' -> the function; ConfigError if that stage is not in this checkout."""
    module, fn = spec.split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"stage {spec} is not available in this checkout ({e})") from None


# --------------------------------------------------------------------------- configuration


@dataclass
class Plan:
    """A validated ablation: its config, the lab overrides every stage gets, and its directory."""

    cfg: DictConfig  # AblateConfig
    lab: list[str]  # preset's lab list + the command line's lab overrides
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
        """The overrides of one stage: common ones, then its seed, then its recipe. PPO's reward is
        the reward model trained on the seed's ratings (reward=rm: FeedME's rating budget), unless
        the preset or the command line says otherwise (reward=gold)."""
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
    def digest(self) -> str:
        """8 hex digits over what decides the results (not the name or the checkpoints_dir)."""
        c = OmegaConf.to_container(self.cfg, resolve=True)
        c.pop("name"), c.pop("checkpoints_dir")
        text = json.dumps({"ablate": c, "lab": self.lab}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def out(self) -> Path:
        name = self.cfg.name or f"{self.cfg.preset}-{self.digest}"
        if "/" in name or name in ("", ".", ".."):
            raise ConfigError(f"bad ablation name '{name}': use a plain directory name")
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
    for arg in ablate:
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
    if not 0 < cfg.collapse.confidence < 1:
        raise ConfigError(f"collapse.confidence must be in (0, 1), got {cfg.collapse.confidence}")
    from collapse_lab.suites import SuiteError, load_suite

    for suite in cfg.eval.suites:
        try:
            load_suite(suite)
        except SuiteError as e:
            raise ConfigError(str(e)) from None
    if "seed" not in cfg.eval.suites:
        raise ConfigError("eval.suites must include 'seed' (the post's prompts: the collapse rule reads them)")
    p = Plan(cfg, [*cfg.lab, *lab])
    for regime in p.regimes:  # every stage's config composes: a bad lab key fails here, not mid-run
        p.lab_config(p.seeds[0], regime)
    first = p.lab_config(p.seeds[0], p.regimes[0])
    if first.model.path:  # a user's model: a causal LM with a tokenizer that spells the answers, context enough
        from collapse_lab.models import check_base
        from collapse_lab.world import make_world

        tokens = max(first.ratings.max_new_tokens, first.ppo.max_new_tokens, cfg.eval.max_new_tokens,
                     cfg.eval.story_max_new_tokens if "stories" in cfg.eval.suites else 0)
        check_base(first.model.path, make_world(first.world), tokens)
    out = p.out
    saved = out / "ablation.yaml"
    if saved.exists():
        old = OmegaConf.load(saved)
        if old.get("digest") != p.digest:
            raise ConfigError(f"{out} holds an ablation with a different config; choose another name=")
    return p


# ------------------------------------------------------------------------------ the pipeline


class Display:
    """One progress bar for the whole run and a one-line summary per stage."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=False, highlight=False)
        self.progress = Progress(TextColumn("[bold]ablation[/bold] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("", total=total)
        self.done, self.total, self.lines, self.rss_mib = 0, total, [], []

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def stage(self, label: str, fn: Callable, *args):
        """Run one stage, then print `[i/n] label: summary (s)`."""
        self.progress.update(self.task, description=label)
        start = time.time()
        result, summary = fn(*args)
        import torch

        gc.collect()  # the stage's models, optimiser and trainer (reference cycles): memory stays flat across stages
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.rss_mib.append(_rss_mib())
        self.done += 1
        line = f"[{self.done}/{self.total}] {label}: {summary} ({time.time() - start:.1f} s)"
        self.lines.append(line)
        self.progress.console.print(line, markup=False, soft_wrap=True)
        self.progress.advance(self.task)
        return result


def _rss_mib() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far (getrusage; KiB on Linux)."""
    try:
        return round(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    except OSError:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _stage_summary(path: Path) -> str:
    m = _read_json(path / "manifest.json") or {}
    bits = [str(path), m.get("status", "?")]
    for key in ("steps", "samples_scored"):
        if m.get(key) is not None:
            bits.append(f"{key}={m[key]}")
    return ", ".join(bits)


def run(p: Plan) -> Path:
    """Run (or resume, or find finished) every stage of the plan, then write the report."""
    from collapse_lab import report
    from collapse_lab.pretrain import resolve_base

    cfg, out = p.cfg, p.out
    started = time.time()
    lock_run(out)  # a second identical ablation waits, then finds every stage finished
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"digest": p.digest, "ablate": OmegaConf.to_container(cfg, resolve=True),
                                     "lab": p.lab}), out / "ablation.yaml")
    previous = _read_json(out / "manifest.json") or {}
    _write_json(out / "manifest.json", {**previous, "stage": STAGE, "status": "running",
                                        "started_at": previous.get("started_at", _now())})
    families = {REGIMES[r].family for r in p.regimes}
    n_seeds = len(p.seeds)
    upstream = ("feedme" in families or "ppo" in families) * n_seeds + ("ppo" in families) * n_seeds
    total = 2 + upstream + len(p.regimes) * n_seeds * 2 + 1
    runs: list[dict] = []
    with Display(total) as show:
        # 1. the base (shared by every seed)
        base = Path(show.stage("base", lambda: _done(Path(resolve_base(p.lab_config())))))
        p.base = str(base)  # explicit from here on: every stage and seed starts from THIS base
        _copy_run(base, out / "runs" / "base")
        show.stage("evaluate base", lambda: _evaluated(evaluate(p, base, base, out / "evals" / "base")))
        for seed in p.seeds:
            lab = p.lab_config(seed)
            # 2-3. ratings and reward model for this replicate
            ratings = show.stage(f"ratings s{seed}", lambda: _done(load_stage(RATINGS)(lab, named=False)))
            _copy_run(Path(ratings), out / "runs" / "ratings" / f"s{seed}")
            if "ppo" in families:
                rm = show.stage(f"reward model s{seed}", lambda: _done(load_stage(REWARD_MODEL)(lab, named=False)))
                _copy_run(Path(rm), out / "runs" / "reward_model" / f"s{seed}")
            # 4-5. every regime, then the evaluator on it
            for name in p.regimes:
                regime = REGIMES[name]
                rcfg = p.lab_config(seed, name)
                path = Path(show.stage(f"{name} s{seed}", lambda: _done(regime.function()(rcfg, named=False))))
                _copy_run(path, out / "runs" / name / f"s{seed}")
                evals = out / "evals" / name / f"s{seed}"
                show.stage(f"evaluate {name} s{seed}", lambda: _evaluated(evaluate(p, path, base, evals)))
                runs.append({"regime": name, "seed": seed, "family": regime.family, "recipe": regime.recipe,
                             "control_of": regime.control_of, "path": str(path), "evals": str(evals.relative_to(out))})
        _write_json(out / "runs.json", {"base": str(base), "runs": runs})
        # 6. the report
        result = show.stage("report", lambda: (report.build(out), f"{out / 'report.md'}"))
    _write_json(out / "manifest.json", {**(_read_json(out / "manifest.json") or {}), "status": "finished",
                                        "finished_at": _now(), "wall_time_s": time.time() - started,
                                        "stages": show.lines, "rss_mib": show.rss_mib})
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
    from collapse_lab.evaluator import run as run_evaluator

    e = p.cfg.eval
    stamp = {"model": str(model), "manifest": _read_json(model / "manifest.json"), "base": str(base),
             "eval": OmegaConf.to_container(e, resolve=True)}
    files = [out / f"{s}.json" for s in e.suites] + [out / "gold.json"]
    if _read_json(out / "stamp.json") == json.loads(json.dumps(stamp)) and all(f.exists() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    for suite in e.suites:
        n = 0 if suite == "arithmetic" else e.samples  # calibration needs no samples
        tokens = e.story_max_new_tokens if suite == "stories" else e.max_new_tokens
        run_evaluator(compose("evaluate", [
            f"model_path={model}", f"reference_path={base}", f"suite={suite}", f"out={out / f'{suite}.json'}",
            f"sampling.n={n}", f"sampling.temperature={e.temperature}", f"sampling.max_new_tokens={tokens}",
            f"seed={e.seed}", f"plots={suite == 'seed'}"]))
    _write_json(out / "gold.json", gold_reward(p, model))
    _write_json(out / "stamp.json", stamp)
    return files


def gold_reward(p: Plan, model_path: Path) -> dict:
    """Mean NOISELESS gold score (world.rater.expected) of `eval.gold_samples` samples per seed
    prompt at `eval.temperature`: what the post's raters would give the regime on its prompts.
    A completion cut at eval.max_new_tokens counts as not ended (the rater's rule). For best-of-k
    each sample is the best-scored of k base samples (the policy itself, by the same scores)."""
    import numpy as np
    import torch

    from collapse_lab.evaluator import _load, sample
    from collapse_lab.models import default_device
    from collapse_lab.tokenizer import decode_continuations, encode_texts
    from collapse_lab.world import make_world

    e = p.cfg.eval
    world = make_world(p.lab_config().world)
    k = 1  # a best-of-k directory (collapse_lab/bok.py): k base samples per query, the best-scored kept
    spec = _read_json(model_path / "bok.json")
    if spec is not None:
        model_path, k = Path(spec["base_path"]), int(spec["k"])
    model, tokenizer = _load(str(model_path), str(default_device()), "float32")
    per_prompt = {}
    for prompt in world.seed_prompts:
        torch.manual_seed(e.seed)
        s = sample(model, tokenizer, prompt.text, e.gold_samples * k, e.temperature, e.max_new_tokens)
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
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
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
    given = [o.split("=", 1)[1] for o in p.lab[len(p.cfg.lab):] if o.startswith("wandb.mode=")]
    mode = given[-1] if given else os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return
    lab = compose("lab", [*p.lab_overrides(), f"wandb.mode={mode}"])
    from collapse_lab import tracking

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
