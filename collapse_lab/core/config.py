"""Typed configuration: Hydra composition over `recipes/`, validated by dataclass schemas.

Every entry point does `cli("lab", fn)` (or `"evaluate"`): compose `recipes/<name>.yaml`
with the command line's `key=value` overrides, validate against the schema below, then
call `fn(cfg)`. A bad recipe, model, world, key, type or value stops the run before any
work with ONE line on stderr naming the bad key and the valid choices, exit code 2.

Config groups (`recipes/<group>/<option>.yaml`): `model` (presets), `world` (generator and
rater parameters), `recipe` (a regime: a small diff on the whole config, `@package _global_`).

The lab-level sections are below; each regime's own section (cfg.ppo, cfg.sft, cfg.dpo, ...) is a dataclass
in its module whose fields carry their valid values (`ranged`, `one_of`), registered by the registry
(collapse_lab/regimes/registry.py: `register_sections`). Configuration imports no stage or regime.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"
GROUPS = ("model", "world", "recipe")


class ConfigError(ValueError):
    """A bad configuration or input; its message is one line naming the bad thing."""


# --------------------------------------------------------------------------- schema


@dataclass
class PeftConfig:
    """LoRA through peft: the policy trains an adapter; its reference is the same model with
    the adapter disabled (no second copy of the weights)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class ModelConfig:
    name: str = "tiny"
    # None: the lab's own base (pretrained by train/pretrain.py from the fields below).
    # Otherwise a Hugging Face hub name or a local directory (from_pretrained).
    path: Optional[str] = None
    arch: str = "llama"  # architecture of a from-scratch base (transformers model_type)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_seq_len: int = 256  # tokens (max_position_embeddings)
    vocab_size: int = 1024  # BPE vocabulary of a from-scratch tokenizer
    split_digits: bool = True  # pre-tokenise " 37" as " 3" + "7": answers become token-prefixes
    dtype: str = "float32"


@dataclass
class MixConfig:
    """Share of each document family in the pretraining corpus (normalised to sum 1)."""

    numbers: float = 0.6
    stories: float = 0.25
    arithmetic: float = 0.15


@dataclass
class RaterConfig:
    """The gold rater's parameters; the points are documented in collapse_lab/world/world.py."""

    # graded (default): favourites + a graded profile over every answer (world.py graded_preference: `levels`
    # levels, `anti_prior` of it anti-correlated with the human prior, the rest seeded by `profile_seed`);
    # two_level: favourites only (every other valid answer scores alike: one (KL, ΔH) curve for every ideal regime)
    profile: str = "graded"
    # the favourite numbers (+preference_strength); null: `n_favourites` drawn by profile_seed, one of them on a
    # mode of the human prior and the others off them (world.py derived_favourites)
    favourites: Optional[list[int]] = None
    n_favourites: int = 3
    preference_strength: float = 1.0  # bonus points for a favourite number (0 = no favourites)
    graded_strength: float = 0.5  # graded only: points between the least and the most preferred level (0 = flat)
    levels: int = 12  # graded only: preference levels over the answers (>= 2)
    anti_prior: float = 0.7  # graded only: weight of the anti-prior component of the profile, in [0, 1]
    profile_seed: int = 0  # graded profile's seeded component, and the derived favourites
    noise_std: float = 0.5  # Gaussian rating noise, points
    integer_scores: bool = True  # round to an integer 1..7 like a human labeller


@dataclass
class WorldConfig:
    name: str = "numbers"
    seed: int = 0
    mix: MixConfig = field(default_factory=MixConfig)
    seed_prompt_share: float = 0.5  # share of number documents that use the five seed prompts
    arithmetic_max: int = 9  # operands of "What is a + b?" are 0..arithmetic_max
    arithmetic_error_rate: float = 0.1  # the corpus answers arithmetic wrongly this often
    bad_story_rate: float = 0.2  # share of stories that loop or ramble (low quality)
    # the number documents' answers: uniform on [low, high], or human (people's "random" numbers: 37, 7,
    # 42, 73 likeliest, round numbers and range ends rarer; world.py HUMAN_FAVOURITES) so the base has
    # H < log|A| (0.969 of it on 0..100) and an entropy change is no longer just a distance; or lm (a small
    # pretrained LM's: " 1" 0.33 on 1..100, then 2, 100, round numbers; world.py LM_DECAY)
    answer_prior: str = "uniform"
    rater: RaterConfig = field(default_factory=RaterConfig)
    # Prompt families that regimes train on (ratings, SFT, PPO draw from the same ones).
    train_families: list[str] = field(default_factory=lambda: ["numbers"])
    # true: no fine-tuning stage ever sees an evaluation prompt (the seed suite's five): World.train_prompt
    # draws numbers from the templates only; pretraining still has them. The seed suite then measures
    # transfer, as in the post; eval/suites/templates.yaml measures trained-on prompts.
    heldout_eval_prompts: bool = False
    # share of the fine-tuning stages' NUMBER prompts drawn from the seed suite's five (the rest from the
    # templates); None: the corpus's seed_prompt_share. Ignored (0) with heldout_eval_prompts. Default 1:
    # the regimes are tuned on the prompts they are judged on (the templates suite measures transfer);
    # with the templates' ranges in the mix, the shared network first learns their pull to ' 7' and PPO
    # spends its run undoing it on the seed prompts (docs/ppo.md)
    train_seed_share: Optional[float] = 1.0
    # true: the pretraining corpus also holds HELDOUT_TEMPLATES (30 number prompts, eval/suites/heldout.yaml) that
    # no fine-tuning stage draws: held-out prompts for the powered design (a corpus key: another base)
    heldout_templates: bool = False
    # fine-tuning draws only template prompts whose range has at least this many answers (0: all; 100: only 0-100
    # and 1-100, the null world's balanced validity selection)
    train_min_range: int = 0
    # the suite the along-training curves and the closed forms are measured on (seed; heldout with heldout_templates)
    curve_suite: str = "seed"
    # world=bandit only: ONE prompt, episodes of ONE token, reward r(t) from a table of
    # [token text, reward] pairs (each text must be one token); every other token gets
    # default_reward. The rater of the bandit world scores by the same table, noiselessly.
    prompt: str = "Human: Pick a random number from 1 to 9.\nAI:"
    rewards: list[Any] = field(default_factory=list)
    default_reward: float = 0.0
    # > 1: the SEQUENCE bandit: table texts may be several tokens, an episode is up to max_tokens
    # tokens then EOS, and a completion earns its table value only if it is exactly that text and
    # ended (π* over whole completions: collapse_lab/evaluation/optimum.py)
    max_tokens: int = 1


# World keys that shape the pretraining corpus: the base depends on these and nothing else
# (the rater, the bandit table, the training families and heldout_eval_prompts are for the regimes).
CORPUS_KEYS = ("world.seed", "world.mix", "world.seed_prompt_share", "world.arithmetic_max",
               "world.arithmetic_error_rate", "world.bad_story_rate", "world.answer_prior", "world.heldout_templates")


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 300
    batch_size: int = 32  # sequences per optimizer step, summed over processes
    # gradient accumulation over this many micro-batches per step, each step's sequences sorted by length
    # first (1: one padded batch per step)
    micro_batches: int = 4
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    save_every: int = 50  # steps between resumable saves
    log_every: int = 20
    tokenizer_docs: int = 20000  # documents the BPE tokenizer is trained on


@dataclass
class RatingsConfig:
    """The RATING BUDGET: `prompts` training prompts x `samples_per_prompt` (k) base samples,
    each scored once by the gold rater. FeedME and the reward model share these ratings."""

    prompts: int = 256
    samples_per_prompt: int = 4  # k
    temperature: float = 1.0
    max_new_tokens: int = 8
    seed: int = 0


@dataclass
class RewardModelConfig:
    """A sequence-classification head on the base, trained on pairs from the ratings (TRL)."""

    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 32
    eval_fraction: float = 0.1  # held-out prompts for pairwise accuracy and Spearman


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled; offline needs no account
    project: str = "collapse-lab"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class CurveConfig:
    """Evaluation ALONG training (collapse_lab/evaluation/frontier.py): every regime's policy is evaluated with the
    shared exact evaluator at `points` optimiser steps (spaced as `spacing` says) and its last one (0: the last only):
    KL to the base, entropy change and its cross term, gold reward, ratings consumed so far, and (PPO,
    reward=gold) the TV to the run's own optimum. The points are rows of the run's metrics.jsonl.
    spacing log (default): steps spaced evenly in log(step), dense where the KL is small (the matched grid starts
    at every curve's first measured point: collapse_lab/evaluation/matched.py); linear: evenly spaced steps.
    `points` counts per Trainer run (each round of iterated FeedME has its own); a PPO run takes
    `ppo.curve_points` where set, FeedME's rounds after the first `sft.later_round_curve_points`.
    max_gap (√nats; None: off): ALSO a point at any step where the probe prompts' exact √KL to the base has moved
    more than this since the last point (frontier.Curve.moved; the row carries frontier/by_gap = 1), so the points
    are dense where training moves fast, whatever the step: a PPO run's held-out KL can jump by more than a nat
    between two log-spaced points, and the matched grid would read that stretch off a straight chord."""

    points: int = 12
    spacing: str = "log"
    max_gap: Optional[float] = None


@dataclass
class RegimeConfig:
    """What a recipe (recipes/recipe/<name>.yaml) declares about itself: `kind`, the regime module it configures
    (collapse_lab/regimes/registry.py maps recipes to modules by it; an entry point given another kind's recipe stops,
    exit 2), and, for a control, `control_of`: the regime whose collapse call also needs a drop below it."""

    kind: Optional[str] = None
    control_of: Optional[str] = None


@dataclass
class LabConfig:
    name: Optional[str] = None  # run directory name; default derived from config and seed
    seed: int = 0
    checkpoints_dir: str = "checkpoints"
    # The base every regime starts from and is compared with (the KL reference). None: the
    # model preset's `path`, or for the lab's own `tiny` the base pretrained here (first if missing).
    base_path: Optional[str] = None
    # Where regimes get rewards: the world's gold rater, or a reward model trained on the ratings.
    reward: str = "gold"
    reward_model_path: Optional[str] = None  # reward=rm: None trains one from the ratings first
    # Mixed precision (autocast; weights stay in model.dtype) of every stage alike: auto = what `accelerate
    # launch` says (its mixed_precision), else none (TRL's own bf16 default is overridden: every regime of a
    # comparison runs at one precision); no | bf16 | fp16. Like the process count, not in a run's hash.
    precision: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ratings: RatingsConfig = field(default_factory=RatingsConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SamplingConfig:
    n: int = 64
    temperature: float = 1.0
    max_new_tokens: int = 24


@dataclass
class EvalConfig:
    model_path: str = MISSING  # a local directory or a Hugging Face hub name
    reference_path: Optional[str] = None  # usually the base: KL and entropy change to it
    suite: str = "seed"  # a name under eval/suites/ or a path to a suite YAML
    out: Optional[str] = None  # default: <model_path>/eval/<suite>.json for lab checkpoints
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 128  # max sequences per forward pass
    seed: int = 0
    plots: bool = True
    allow_unfinished: bool = False  # evaluate a lab run whose manifest is not finished (with a warning)
    verbose: bool = True  # print the post's table per suite (the ablation's evaluations: its own verbose)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class CollapseRule:
    """When the report calls a regime `collapsed` (stated in report.md too).

    d = mean over the seed prompts of H/log|A| (normalised answer entropy), regime minus base,
    per seed; collapsed iff mean(d) < -threshold AND the upper end of its `confidence`
    interval is below 0 (across seeds; with one seed, across the prompts instead).
    A regime with a finite-sample control in the ablation (sft: sft-random, SFT on as many randomly
    chosen base samples) must ALSO meet that rule on d_c = H/log|A| (regime) - H/log|A| (control),
    paired by seed: fitting N samples narrows the entropy by ~(|A|-1)/(2N) nats without any selection,
    and only a drop beyond the control's is collapse. Best-of-k is exact (no finite sample): base only.
    """

    threshold: float = 0.05  # in units of log|A| (0.05 ~ 0.23 nats on 101 answers)
    confidence: float = 0.95


@dataclass
class FrontierRule:
    """The verdict's first question, at MATCHED distance (collapse_lab/evaluation/frontier.py): each regime's curve
    along training (d = Δ(H/log|A|) as a function of KL to the base, and of the gold gain) is
    interpolated on `grid_points` values spread over the range every seed of both regimes reaches;
    D = mean over the grid of d(KL-penalised regime) − d(FeedME), per seed, then a t-interval across
    seeds (collapse.confidence). "No difference" when the whole interval lies within ±margin (an
    equivalence call), "more"/"less" entropy when it excludes 0 with |mean| ≥ margin; one seed: no call.
    """

    margin: float = 0.02  # in units of log|A| (0.02 ~ 0.09 nats on 101 answers)
    grid_points: int = 8
    # a regime whose entropy dropped with a gold gain below this (rating points, 1-7 scale; exact, on the answers)
    # is flagged: not preference-driven collapse (collapse_lab/lab/report.py no_gold_gain)
    gain_floor: float = 0.02
    # the ONE comparison the verdict's first question rests on, "<KL-regularised regime>:<FeedME regime>" (e.g.
    # "kl0.3:sft"); the others are reported as secondary. None: every KL-penalised online RL regime vs FeedME
    primary: Optional[str] = None
    # true: the call on D uses its interval with seeds AND prompts as crossed random effects (matched.crossed: each
    # prompt matched at its own KL), for designs with many held-out prompts (preset=powered); false: across seeds
    random_prompts: bool = False


@dataclass
class AblateEvalConfig:
    """The shared evaluator's settings for every model of an ablation (base included)."""

    # seed: the post's prompts (the collapse rule; held out of fine-tuning with world.heldout_eval_prompts);
    # templates: trained-on number prompts (exact answer distributions only, no samples)
    suites: list[str] = field(default_factory=lambda: ["seed", "arithmetic", "stories", "templates"])
    samples: int = 64  # sampling.n on the seed and stories suites (0: exact metrics only)
    max_new_tokens: int = 8  # seed suite samples (a number and EOS fit in 8)
    story_max_new_tokens: int = 32
    temperature: float = 1.0
    gold_samples: int = 64  # samples per seed prompt scored by the gold rater (mean gold reward)
    seed: int = 0


@dataclass
class AblateConfig:
    """`collapse-lab ablate`: base -> ratings -> reward model -> regimes x seeds -> evaluator -> report.

    Any override that is not a key below is a LAB override (model=, world.*, ppo.*, ...), applied
    to every stage after the preset's `lab` list; `world.preference=X` is an alias of
    `world.rater.preference_strength=X`. The recipe, seed and name of each stage are set here.
    """

    name: Optional[str] = None  # checkpoints/ablations/<name>; default <preset>-<hash of the config>
    preset: str = "default"  # recipes/preset/<preset>.yaml (quick | default)
    seed: int = 0  # the first replicate seed; replicates are seed, seed+1, ..., seed+seeds-1
    seeds: int = 3
    regimes: list[str] = field(default_factory=lambda: ["sft", "bok", "kl0", "kl0.01", "kl0.1", "ent0.01"])
    # also train each listed regime's control for every seed (sft -> sft-random), unless listed already;
    # the collapse rule then needs the regime's drop vs its control too (CollapseRule)
    controls: bool = True
    checkpoints_dir: str = "checkpoints"
    # worker processes for the stages after the base, the CPU threads split between them (1: this process,
    # in order). null: 2 on a machine with 2+ cores and no GPU, else 1. Not part of the ablation's digest
    jobs: Optional[int] = None
    verbose: bool = False  # print every evaluation's table (else one line per stage start and end)
    # the preset's lab settings, a nested mapping as in the lab's YAML ({ppo: {steps: 10}, model: tiny}),
    # applied to every stage before the command line's lab overrides
    lab: dict[str, Any] = field(default_factory=dict)
    collapse: CollapseRule = field(default_factory=CollapseRule)
    frontier: FrontierRule = field(default_factory=FrontierRule)
    eval: AblateEvalConfig = field(default_factory=AblateEvalConfig)


SCHEMAS = {"lab": LabConfig, "evaluate": EvalConfig, "ablate": AblateConfig}

# String fields with a closed set of values (checked after composition).
CHOICES = {
    "wandb.mode": ("online", "offline", "disabled"),
    "reward": ("gold", "rm"),
    "world.answer_prior": ("uniform", "human", "lm"),  # collapse_lab/world/world.py ANSWER_PRIORS
    "world.rater.profile": ("graded", "two_level"),
    "curve.spacing": ("log", "linear"),  # collapse_lab/evaluation/frontier.py schedule  # collapse_lab/world/world.py RATER_PROFILES
    "model.dtype": ("float32", "bfloat16", "float16"),
    "precision": ("auto", "no", "bf16", "fp16"),
    "model.arch": ("llama", "gpt2", "gpt_neox", "qwen2", "mistral", "gemma3_text"),  # from-scratch bases: any of these
    "dtype": ("float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda", "mps"),
}


# Every numeric key's valid values (checked after composition, before any work). A new numeric key needs
# an entry here, or in a regime's section its field's metadata (`ranged`): tests/test_faults.py walks the schemas.


@dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        return (math.isfinite(x) and (self.low < x if self.low_open else self.low <= x)
                and (x < self.high if self.high_open else x <= self.high))

    def __str__(self) -> str:
        num = lambda x: str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"  # noqa: E731 (2**32 - 1 in full)
        if self.high == math.inf:
            return "a finite number" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {num(self.low)}"
        return f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


ANY, COUNT, NONNEG, POSITIVE = Range(), Range(1), Range(0), Range(0, low_open=True)
SHARE, OPEN_SHARE = Range(0, 1), Range(0, 1, True, True)
SEED = Range(0, 2**32 - 1)  # numpy's and torch's seeds are below 2**32
# sampling temperatures: logits / T must stay finite (T = 1e-45 made every logit inf)
TEMPERATURE = Range(1e-3)
# β of the per-token KL penalty: larger ones overflow the rewards (float32) before they mean anything
KL_COEF = Range(0, 1e4)
RANGES = {
    "lab": {
        "seed": SEED, "model.hidden_size": COUNT, "model.num_layers": COUNT, "model.num_heads": COUNT,
        "model.intermediate_size": COUNT, "model.max_seq_len": COUNT, "model.vocab_size": COUNT,
        "peft.r": COUNT, "peft.alpha": POSITIVE, "peft.dropout": Range(0, 1, high_open=True),
        "world.seed": SEED, "world.mix.numbers": NONNEG, "world.mix.stories": NONNEG,
        "world.mix.arithmetic": NONNEG, "world.seed_prompt_share": SHARE, "world.train_seed_share": SHARE, "world.arithmetic_max": NONNEG,
        "world.arithmetic_error_rate": SHARE, "world.bad_story_rate": SHARE, "world.default_reward": ANY,
        "world.rater.preference_strength": ANY, "world.rater.noise_std": NONNEG,
        "world.rater.graded_strength": NONNEG, "world.rater.levels": Range(2), "world.rater.anti_prior": SHARE,
        "world.rater.profile_seed": SEED, "world.rater.n_favourites": NONNEG, "world.train_min_range": NONNEG,
        "pretrain.seed": SEED, "pretrain.steps": COUNT, "pretrain.batch_size": COUNT, "pretrain.micro_batches": COUNT, "pretrain.lr": POSITIVE,
        "pretrain.warmup_steps": NONNEG, "pretrain.weight_decay": NONNEG, "pretrain.save_every": COUNT,
        "pretrain.log_every": COUNT, "pretrain.tokenizer_docs": COUNT,
        "ratings.prompts": COUNT, "ratings.samples_per_prompt": COUNT, "ratings.temperature": TEMPERATURE,
        "ratings.max_new_tokens": COUNT, "ratings.seed": SEED,
        "reward_model.epochs": POSITIVE, "reward_model.lr": POSITIVE, "reward_model.batch_size": COUNT,
        "reward_model.eval_fraction": OPEN_SHARE,
        "curve.points": NONNEG, "curve.max_gap": POSITIVE, "world.max_tokens": COUNT,
    },
    "evaluate": {
        "batch_size": COUNT, "seed": SEED, "sampling.n": NONNEG, "sampling.temperature": TEMPERATURE,
        "sampling.max_new_tokens": COUNT,
    },
    "ablate": {
        "seed": SEED, "seeds": COUNT, "jobs": COUNT, "collapse.threshold": NONNEG, "collapse.confidence": OPEN_SHARE,
        "frontier.margin": NONNEG, "frontier.grid_points": COUNT, "frontier.gain_floor": NONNEG,
        "eval.samples": NONNEG, "eval.max_new_tokens": COUNT, "eval.story_max_new_tokens": COUNT,
        "eval.temperature": TEMPERATURE, "eval.gold_samples": COUNT, "eval.seed": SEED,
    },
}


def ranged(default: Any, valid: Range) -> Any:
    """A numeric field of a section with its valid values, checked after composition:
    `steps: int = ranged(100, COUNT)` (the regimes' sections carry their ranges this way)."""
    return field(default=default, metadata={"range": valid})


def one_of(default: str, *choices: str) -> Any:
    """A string field with a closed set of values: `loss_type: str = one_of("sigmoid", "sigmoid", "ipo")`."""
    return field(default=default, metadata={"choices": choices})


def _field_rules(schema: type, kind: str, prefix: str = "") -> dict[str, Any]:
    """{dotted key: its fields' `kind` metadata ("range" or "choices")} over a dataclass schema, recursively."""
    out = {}
    for f in dataclasses.fields(schema):
        if kind in f.metadata:
            out[prefix + f.name] = f.metadata[kind]
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out.update(_field_rules(f.default_factory, kind, f"{prefix}{f.name}."))
    return out


# The regimes' own config sections (cfg.<name>: a dataclass in the regime's module, its fields' ranges and
# choices in their metadata). The registry (collapse_lab/regimes/registry.py) registers them: configuration, the
# ground floor, imports no regime.
SECTIONS: dict[str, type] = {}


def register_sections(sections: dict[str, type]) -> None:
    """Add regime sections to the lab's schema (collapse_lab/regimes/registry.py, once, when it loads)."""
    SECTIONS.update(sections)


def schema(config_name: str) -> type:
    """The schema of `config_name`; for "lab", LabConfig with one field per registered regime section."""
    if config_name != "lab":
        return SCHEMAS[config_name]
    if not SECTIONS:
        raise RuntimeError("no regime config section is registered: import collapse_lab.regimes.registry (it collects "
                           "the regimes and registers their sections) before composing a lab config")
    return _lab_schema(tuple(SECTIONS.items()))


@functools.lru_cache(maxsize=None)
def _lab_schema(sections: tuple[tuple[str, type], ...]) -> type:
    return dataclasses.make_dataclass("LabConfig", [(k, v, field(default_factory=v)) for k, v in sections],
                                      bases=(LabConfig,))


def ranges(config_name: str) -> dict[str, Range]:
    """Every numeric key's valid values: RANGES (the lab-level sections) and the regime sections' metadata."""
    return {**RANGES[config_name], **_field_rules(schema(config_name), "range")}


def choices(config_name: str) -> dict[str, tuple]:
    """Every closed-choice key's values: CHOICES and the regime sections' metadata."""
    return {**CHOICES, **_field_rules(schema(config_name), "choices")}


def _check_ranges(cfg: DictConfig, config_name: str) -> None:
    for key, valid in ranges(config_name).items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, bool) and value not in valid:
            raise ConfigError(f"{key} must be {valid}, got {value}")


# ---------------------------------------------------------------------- composition


def group_options(group: str) -> list[str]:
    """The valid choices of a config group: the YAML files in recipes/<group>/."""
    return sorted(p.stem for p in (RECIPES_DIR / group).glob("*.yaml"))


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _check_key(schema: DictConfig, dotted: str) -> None:
    """Raise ConfigError if `dotted` is not a key of the schema, naming the valid keys."""
    node, walked = schema, []
    for part in dotted.split("."):
        valid = _valid_keys(node)
        if part not in valid:
            where = ".".join(walked) or "the top level"
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint}; valid keys under {where}: {', '.join(valid)}")
        node, walked = node._get_node(part), walked + [part]


def _check_overrides(schema: DictConfig, overrides: list[str], groups: tuple[str, ...]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's parse errors are multi-line
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None
    for o in parsed:
        key = o.key_or_group
        if key in groups:
            value, options = o.value(), group_options(key)
            if value is not None and value not in options:
                raise ConfigError(f"unknown {key} '{value}'; valid choices: {', '.join(options)}")
        elif key.startswith("hydra"):
            raise ConfigError(f"hydra settings cannot be overridden here: '{key}'")
        else:
            _check_key(schema, key)


def _check_choices(cfg: DictConfig, config_name: str) -> None:
    for key, valid in choices(config_name).items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in valid:
            raise ConfigError(f"bad value '{value}' for '{key}'; valid choices: {', '.join(valid)}")


def _wandb_mode_from_env(overrides: list[str]) -> list[str]:
    """$WANDB_MODE as the override `wandb.mode=...` unless the overrides give wandb.mode (the command line wins
    over the environment, the environment over the recipes); wandb's own spellings dryrun/run too."""
    import os

    env = os.environ.get("WANDB_MODE")
    if not env or any(o.lstrip("+~").startswith("wandb.mode=") for o in overrides):
        return []
    mode = {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode not in CHOICES["wandb.mode"]:
        raise ConfigError(f"WANDB_MODE={env} in the environment; valid choices: {', '.join(CHOICES['wandb.mode'])}")
    return [f"wandb.mode={mode}"]


def _check_wandb_login(cfg: DictConfig) -> None:
    """wandb.mode=online needs credentials (WANDB_API_KEY or `wandb login`'s netrc entry): without them W&B
    stops the run at its first log, after the work it was to log."""
    import netrc
    import os
    from urllib.parse import urlparse

    if cfg.wandb.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise ConfigError(f"wandb.mode=online needs a W&B login for {host} (run `wandb login` or set WANDB_API_KEY); "
                          "or use wandb.mode=offline and `wandb sync` later")


def _check_lab(cfg: DictConfig) -> None:
    """The lab config's constraints between keys and on structured values (the ranges check single numbers)."""
    _check_wandb_login(cfg)
    m = cfg.model
    if m.path is None and m.hidden_size % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide model.hidden_size={m.hidden_size} "
                          f"(each head gets hidden_size/num_heads dimensions)")
    for pair in cfg.world.rewards:
        ok = isinstance(pair, ListConfig) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]
        try:
            ok = ok and math.isfinite(float(pair[1])) and not isinstance(pair[1], (bool, str))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            shown = OmegaConf.to_container(pair) if isinstance(pair, ListConfig) else pair
            raise ConfigError(f"world.rewards: each entry must be [token text, finite reward], got {shown!r}")


def _one_line(e: Exception, schema: Optional[DictConfig] = None) -> str:
    """Hydra/OmegaConf errors are multi-line; keep the message and the full key. A key the schema lacks
    (a recipe's typo) is named, with the file it came from and the valid keys."""
    from omegaconf.errors import ConfigKeyError

    cause = e
    while not getattr(cause, "full_key", None) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    if key and schema is not None and isinstance(cause, (ConfigKeyError, AttributeError)):
        where = re.match(r"In '([^']+)'", str(e).strip())
        try:
            _check_key(schema, key)
        except ConfigError as bad:
            return f"{bad}" + (f" (in recipes/{where[1]}.yaml)" if where else "")
    return f"bad value for '{key}': {msg}" if key else msg


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose recipes/<config_name>.yaml + overrides, validated; raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    if config_name not in SCHEMAS:
        raise ConfigError(f"unknown config '{config_name}'; valid choices: {', '.join(SCHEMAS)}")
    structured = OmegaConf.structured(schema(config_name))
    _check_overrides(structured, overrides, GROUPS if config_name == "lab" else ())
    if config_name == "lab":
        overrides = [*_wandb_mode_from_env(overrides), *overrides]
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema(config_name))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as e:
        raise ConfigError(_one_line(e, structured)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except Exception as e:
        if isinstance(e, MissingMandatoryValue):
            raise ConfigError(f"missing required key '{e.full_key}' (give it as {e.full_key}=...)") from None
        raise ConfigError(_one_line(e)) from None
    _check_choices(cfg, config_name)
    _check_ranges(cfg, config_name)
    if config_name == "lab":
        _check_lab(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.set_struct(cfg, True)
    return cfg


USAGE = """usage: {prog} [key=value ...] [--cfg]
  Hydra-style overrides on recipes/{name}.yaml, e.g. seed=2 model=tiny wandb.mode=disabled
  --cfg    print the resolved config and exit
  groups:  {groups}"""


def cli(config_name: str, fn: Callable[[DictConfig], Any], argv: Optional[list[str]] = None) -> Any:
    """The body of every entry point: compose, validate, run; bad input → one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        groups = "; ".join(f"{g}={'|'.join(group_options(g))}" for g in GROUPS) if config_name == "lab" else "-"
        print(USAGE.format(prog=Path(sys.argv[0]).name, name=config_name, groups=groups))
        return None
    with one_line_errors():
        cfg = compose(config_name, [a for a in argv if a != "--cfg"])
        if "--cfg" in argv:
            print(OmegaConf.to_yaml(cfg), end="")
            return None
        import torch

        # Subnormal floats make CPU training ~50x slower once weights get small; worker threads copy
        # this setting when they start, so it is set before any computation of the run.
        torch.set_flush_denormal(True)
        quiet_libraries()
        result = fn(cfg)
        # A launch's last step: every process waits for the others, then the process group goes, its gloo
        # threads joined. Left to the interpreter's exit, a process died after its run had finished
        # (SIGABRT: "terminate called without an active exception", a joinable thread destroyed at exit).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return result


@contextmanager
def one_line_errors() -> Iterator[None]:
    """What every command does with an error: bad input (ConfigError) is one line on stderr and exit 2; a run
    failure the lab recognises (a full disk, `run_failure`) is one line and exit 1; anything else propagates."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        failure = run_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


# errno names of a full disk, a file-size limit (ulimit -f: Python ignores SIGXFSZ, writes fail with EFBIG), a quota
_NO_SPACE = ("ENOSPC", "EFBIG", "EDQUOT")
_NO_SPACE_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "FileTooLarge", "StorageFull",
                  "PytorchStreamWriter failed", "inline_container.cc")  # torch.save's writer: no errno in its message


def run_failure(e: BaseException) -> Optional[str]:
    """The one-line message of a run that failed for a known reason after it started (exit 1; its manifest
    is failed, or running and resumable), None for anything else (a bug: its traceback is shown):
    a non-finite loss (FloatingPointError: the stage wrote its manifest failed) and a write that found no
    space (a full disk or a file-size limit, from the OS, safetensors or torch: the run resumes once there is)."""
    import errno

    if isinstance(e, FloatingPointError):
        return str(e).strip().splitlines()[0] if str(e).strip() else "non-finite value"
    text = f"{e.__class__.__name__}: {e}"
    codes = {getattr(errno, n) for n in _NO_SPACE if hasattr(errno, n)}
    if getattr(e, "errno", None) in codes or any(t in text for t in _NO_SPACE_TEXT):
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return (f"cannot write{where}: out of disk space or over the file-size limit ({text.splitlines()[0][:160]}); "
                "free some (or raise the limit) and rerun the same command: the run resumes")
    return None


def quiet_libraries() -> None:
    """One progress bar per stage (its own): not also transformers' shard loading/saving bars and datasets'
    map/save bars, which a stage's save or load would print between the stage's bar and summary line."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


# --------------------------------------------------------------------- run directories


def config_hash(cfg: DictConfig, keys: tuple[str, ...]) -> str:
    """8 hex digits of the SHA-256 of the resolved sub-config `keys` (sorted YAML)."""
    text = OmegaConf.to_yaml(stage_config(cfg, keys), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def stage_config(cfg: DictConfig, keys: tuple[str, ...]) -> DictConfig:
    """The part of the config a stage depends on (what decides its run directory).

    Keys may be dotted (`world.mix`) to take part of a section.
    """
    out = OmegaConf.create({})
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
        OmegaConf.update(out, key, value, force_add=True)
    return out


def run_dir(cfg: DictConfig, stage: str, keys: tuple[str, ...], default_name: str, named: bool = True) -> Path:
    """checkpoints/<stage>/<name>: `name=` if given (and `named`), else `<default_name>-<hash of keys>`.

    `named=False` for upstream stages a command runs on the way (the base of a PPO run does
    not take the PPO run's name). A directory already holding a DIFFERENT config (for `keys`)
    is never reused: that is a ConfigError, so two configs never share a directory. Checked here (early,
    before any work) and again by the stage once it holds the directory's lock (`same_config`): a run
    started at the same moment may write its config.yaml between the two.
    """
    name = cfg.name if named and cfg.name else f"{default_name}-{config_hash(cfg, keys)}"
    check_name(name, "run name")
    check_run_location(cfg)
    path = Path(cfg.checkpoints_dir) / stage / name
    _RUN_KEYS[path.absolute()] = keys
    same_config(cfg, path)
    return path


def check_run_location(cfg: DictConfig) -> None:
    """Where a command's runs go, before any work: `name=` a valid directory name, checkpoints_dir not a file."""
    if cfg.name is not None:
        check_name(cfg.name, "run name")
    root = Path(cfg.checkpoints_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"checkpoints_dir={root} is a file; give a directory")


# run directory -> the config keys it depends on (run_dir records them; same_config reads them under the lock)
_RUN_KEYS: dict[Path, tuple[str, ...]] = {}


def same_config(cfg: DictConfig, path: Path) -> None:
    """ConfigError unless `path` holds no config.yaml yet or one equal to `cfg` on the keys its run_dir named."""
    keys = _RUN_KEYS.get(Path(path).absolute())
    saved = Path(path) / "config.yaml"
    if keys is None or not saved.exists():
        return
    saved_cfg = OmegaConf.create(read_record(saved, rerun_repair(path)))
    absent = object()  # a key the saved config lacks (an older schema), not a key set to null
    old = stage_config(saved_cfg, tuple(k for k in keys if OmegaConf.select(saved_cfg, k, default=absent) is not absent))
    new = stage_config(cfg, keys)
    if OmegaConf.to_yaml(old, sort_keys=True) != OmegaConf.to_yaml(new, sort_keys=True):
        diff = _first_difference(OmegaConf.to_container(old), OmegaConf.to_container(new))
        raise ConfigError(f"{path} holds a run with a different config (at '{diff}'); choose another name=")


def check_name(name: str, what: str) -> None:
    """A name that becomes ONE directory under checkpoints/ (no path separators, not '.' or '..', no NUL, at
    most 255 bytes: the longest file name Linux and macOS file systems take)."""
    if not isinstance(name, str) or "/" in name or "\\" in name or "\0" in name or name in ("", ".", ".."):
        raise ConfigError(f"bad {what} '{name}': use a plain directory name")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ConfigError(f"bad {what} '{name[:40]}...': {len(name.encode('utf-8', 'surrogateescape'))} bytes, "
                          "at most 255 (a file name's limit)")


# ------------------------------------------------------------------------- bookkeeping files


def rerun_repair(run: Path) -> str:
    """The repair of a damaged file in a stage's run directory: the run is redone from scratch."""
    return f"repair: rm -r {run} and rerun the command (the run is redone)"


def read_record(path: Path, repair: str, kind: Optional[str] = None) -> Any:
    """Every bookkeeping file the lab reads back (manifest.json, metrics.jsonl, config.yaml, runs.json,
    ablation.yaml, stamps and eval JSON) is read through this ONE function: the parsed content (`kind`, by
    default the suffix: json -> a dict, jsonl -> a list of dicts, yaml -> a plain dict), None when the file is
    absent. A damaged file (cut short by a kill or a full disk, not UTF-8, not the shape the lab writes) is a
    ConfigError naming the file and `repair`, the command that repairs it."""
    import json

    import yaml

    path = Path(path)
    kind = kind or path.suffix.lstrip(".")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e.__class__.__name__}); {repair}") from None
    try:
        if kind == "jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
            ok = all(isinstance(r, dict) for r in data)
        elif kind == "json":
            data = json.loads(text)
            ok = isinstance(data, dict)
        else:
            data = yaml.safe_load(text)
            ok = isinstance(data, dict)
    except (ValueError, yaml.YAMLError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"{path} is damaged ({reason}); {repair}") from None
    if not ok:
        raise ConfigError(f"{path} is damaged (not the {'rows' if kind == 'jsonl' else 'mapping'} the lab writes); "
                          f"{repair}")
    return data


def check_output(path: Path, what: str, is_dir: bool = False) -> None:
    """Before any work: `path` (a file, or with is_dir a directory) can be written. Its nearest existing
    ancestor must be a writable directory (probed with a temporary file: permission bits say nothing for
    root, a read-only mount or /proc); an existing file must not be a directory, and vice versa."""
    import tempfile

    path = Path(path)
    if path.exists() and path.is_dir() != is_dir:
        raise ConfigError(f"{what}={path} is {'a file' if is_dir else 'a directory'}; "
                          f"give {'a directory' if is_dir else 'a file path'}")
    parent = path if is_dir and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"{what}={path}: cannot write under {parent} ({e.strerror or e})") from None


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    return prefix or "<root>"


def save_config(cfg: DictConfig, path: Path) -> None:
    """Atomic (a temporary file renamed): run_dir compares a rerun's config with this file."""
    path.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path / "config.yaml.tmp", resolve=True)
    (path / "config.yaml.tmp").replace(path / "config.yaml")
