"""The report's inputs: an ablation directory's stored results read back (every file through
core.config.read_record: damage is one line naming the file and its repair), and the per-run record the
statistics summarise. The metric tables' keys and formats live here, beside the records they read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from collapse_lab.core.config import ConfigError, read_record
from collapse_lab.core.names import ONLINE, SELECTION, get_dotted
from collapse_lab.evaluation.matched import KEYS


# Every per-regime number the report shows: (key in a run's record, label, format, its table), in table order.
# Tables: collapse (the seed suite's exact metrics), diversity (sampling, calibration, gold reward), trained (the
# same exact metrics on TRAINED-ON prompts, eval/suites/templates.yaml, beside the seed suite's held-out ones).
METRICS = [
    ("norm_entropy", "H / log|A|", ".3f", "collapse"),
    ("answer_entropy", "H (nats)", ".3f", "collapse"),
    ("delta_norm_entropy", "Δ(H/log|A|) vs base", "+.3f", "collapse"),
    ("delta_norm_entropy_control", "Δ(H/log|A|) vs control", "+.3f", "collapse"),
    ("valid_mass", "valid mass M", ".3f", "collapse"),
    ("top_prob", "top p(a)", ".3f", "collapse"),
    ("entropy_upper_bound", "post's bound (nats)", ".2f", "collapse"),
    ("next_token_entropy", "next-token H (nats)", ".2f", "collapse"),
    ("kl_to_reference", "KL to base (nats)", ".4f", "collapse"),
    ("tv_to_reference", "TV", ".3f", "collapse"),
    ("abs_entropy_change", "|ΔH| (nats)", ".3f", "collapse"),
    ("fannes_entropy_bound", "Fannes bound (nats)", ".3f", "collapse"),
    ("within_bound", "|ΔH| ≤ bound (share)", ".2f", "collapse"),
    # PPO runs: the closed-form optimum π* of the run's own objective (β, α) with the GOLD rater's mean
    # score (collapse_lab/evaluation/optimum.py); for reward=rm runs, how far the learned reward led from it
    ("optimum_tv", "TV to own π* (gold)", ".3f", "collapse"),
    ("optimum_norm_entropy", "π*: H/log|A|", ".3f", "collapse"),
    ("sequence_entropy", "seq. entropy (nats)", ".2f", "diversity"),
    ("distinct_1", "distinct-1", ".3f", "diversity"),
    ("distinct_2", "distinct-2", ".3f", "diversity"),
    ("repetition_loop_rate", "repetition loops", ".3f", "diversity"),
    ("well_formed_rate", "well-formed", ".3f", "diversity"),
    ("stories.sequence_entropy", "stories seq. H (nats)", ".1f", "diversity"),
    ("stories.distinct_2", "stories distinct-2", ".3f", "diversity"),
    ("stories.repetition_loop_rate", "stories loops", ".3f", "diversity"),
    ("ece", "ECE", ".3f", "diversity"),
    ("brier", "Brier", ".3f", "diversity"),
    ("gold_reward", "gold reward (noiseless)", ".2f", "diversity"),
    ("trained.norm_entropy", "H / log|A|", ".3f", "trained"),
    ("trained.delta_norm_entropy", "Δ(H/log|A|) vs base", "+.3f", "trained"),
    ("trained.kl_to_reference", "KL to base (nats)", ".4f", "trained"),
    ("trained.tv_to_reference", "TV", ".3f", "trained"),
    ("trained.top_prob", "top p(a)", ".3f", "trained"),
    ("trained.valid_mass", "valid mass M", ".3f", "trained"),
    ("trained.optimum_tv", "TV to own π* (gold)", ".3f", "trained"),
]
COLLAPSE_METRICS, DIVERSITY_METRICS, TRAINED_METRICS = ([m[:3] for m in METRICS if m[3] == table]
                                                         for table in ("collapse", "diversity", "trained"))


BUDGET_KEYS = ("samples_scored", "steps", "tokens_trained")


# each metric's valid range: its t-interval is clipped to it (a valid mass of 1.208 is no valid mass)
SHARE_METRICS = {"norm_entropy", "valid_mass", "top_prob", "tv_to_reference", "within_bound", "optimum_tv",
                 "optimum_norm_entropy", "distinct_1", "distinct_2", "repetition_loop_rate", "well_formed_rate", "ece",
                 "brier", "stories.distinct_2", "stories.repetition_loop_rate"}


NONNEG_METRICS = {"answer_entropy", "entropy_upper_bound", "next_token_entropy", "kl_to_reference", "abs_entropy_change",
                  "fannes_entropy_bound", "sequence_entropy", "stories.sequence_entropy"}


def bounds_of(key: str) -> Optional[tuple[float, float]]:
    """The valid range of a report metric (templates' `trained.` metrics as their seed-suite namesakes)."""
    k = key.removeprefix("trained.")
    if k in SHARE_METRICS:
        return (0.0, 1.0)
    if k in NONNEG_METRICS:
        return (0.0, math.inf)
    if k.startswith("delta_norm_entropy"):
        return (-1.0, 1.0)
    if k == "gold_reward":  # noiseless: 1 + 5 for a valid, clean answer, + the preference terms (above 7 at best)
        return (1.0, math.inf)
    return None


def templates_trained_on(lab: dict) -> bool:
    """Whether a run's fine-tuning drew number prompts from the templates: always with
    world.heldout_eval_prompts, otherwise when world.train_seed_share (null: the corpus's
    seed_prompt_share) is below 1."""
    if get_dotted(lab, "world.heldout_eval_prompts"):
        return True
    share = get_dotted(lab, "world.train_seed_share")
    share = get_dotted(lab, "world.seed_prompt_share") if share is None else share
    return share is None or float(share) < 1


TRAINING_CURVES = ("objective/kl", "objective/rlhf_reward", "objective/entropy", "objective/scores",
                   "policy/clipfrac", "val/vf_loss", "loss", "train/loss")


def run_record(evals: Path) -> dict:
    """The numbers of ONE evaluated model (a regime at a seed, or the base): flat, per-prompt means."""
    seed = _json(evals / "seed.json")
    prompts = [p for p in seed["prompts"] if "answers" in p]
    rec: dict[str, Any] = {"per_prompt": {}}
    for p in prompts:
        rec["per_prompt"][p["id"]] = {
            "answer_entropy": p["answer_entropy"], "norm_entropy": p["answer_entropy"] / p["max_entropy"],
            "top_answer": p["top_answer"], "top_prob": p["top_prob"], "valid_mass": p["valid_mass"]}
    col = lambda k: [p[k] for p in prompts if p.get(k) is not None]
    for key in ("answer_entropy", "valid_mass", "top_prob", "entropy_upper_bound", "next_token_entropy",
                "kl_to_reference", "tv_to_reference", "fannes_entropy_bound"):
        rec[key] = _mean(col(key))
    rec["norm_entropy"] = _mean([p["answer_entropy"] / p["max_entropy"] for p in prompts])
    rec["optimum_tv"] = _mean(col("optimum_tv"))
    rec["optimum_norm_entropy"] = _mean([p["optimum_answer_entropy"] / p["max_entropy"] for p in prompts
                                         if p.get("optimum_answer_entropy") is not None])
    changes = col("entropy_change")
    rec["abs_entropy_change"] = _mean([abs(c) for c in changes])
    rec["within_bound"] = _mean([float(abs(p["entropy_change"]) <= p["fannes_entropy_bound"] + 1e-9)
                                 for p in prompts if p.get("entropy_change") is not None])
    rec["points"] = [(p["kl_to_reference"], abs(p["entropy_change"])) for p in prompts
                     if p.get("kl_to_reference") is not None]  # for the |ΔH| vs KL plot
    for key in ("sequence_entropy", "distinct_1", "distinct_2", "repetition_loop_rate", "well_formed_rate"):
        rec[key] = _mean([p["sampling"][key] for p in prompts if p.get("sampling", {}).get(key) is not None])
    # the post's figure: the run's answer distribution per prompt
    rec["answers"] = {p["id"]: {"answers": p["answers"], "probs": p["answer_probs"],
                                "max_entropy": p["max_entropy"]} for p in prompts}
    stories = _json(evals / "stories.json", missing=True)
    if stories:
        s = [p["sampling"] for p in stories["prompts"] if "sampling" in p]
        for key in ("sequence_entropy", "distinct_2", "repetition_loop_rate"):
            rec[f"stories.{key}"] = _mean([x[key] for x in s if x.get(key) is not None])
    arith = _json(evals / "arithmetic.json", missing=True)
    if arith:
        rec["ece"], rec["brier"] = arith["summary"].get("ece"), arith["summary"].get("brier")
    gold = _json(evals / "gold.json", missing=True)
    rec["gold_reward"] = gold.get("mean") if gold else None
    rec["gold_prompts"] = list(gold["per_prompt"].values()) if gold else []
    trained = _json(evals / "templates.json", missing=True)  # ablations before the templates suite: None
    t = [p for p in trained["prompts"] if "answers" in p] if trained else []
    rec["trained.norm_entropy"] = _mean([p["answer_entropy"] / p["max_entropy"] for p in t])
    # Δ vs the base per prompt, from the evaluator's reference (the base): the seed suite's d, on these prompts
    rec["trained.delta_norm_entropy"] = _mean([p["entropy_change"] / p["max_entropy"] for p in t
                                               if p.get("entropy_change") is not None])
    for key in ("kl_to_reference", "tv_to_reference", "top_prob", "valid_mass", "optimum_tv"):
        rec[f"trained.{key}"] = _mean([p[key] for p in t if p.get(key) is not None])
    return rec


EARLY_UPDATES = 10  # PPO's first updates, where its path leaves the base (docs/ppo.md, its path)


def early_updates(run_dir: Path, steps: int = EARLY_UPDATES) -> dict:
    """How PPO's first `steps` updates met its clip, from the run's metrics.jsonl (rows with policy/clipfrac, the
    lab's PPO only): {clipfrac: mean share of sampled tokens whose ratio r = π/π_old left [1 − ε, 1 + ε],
    approxkl: mean of ½(log r)², how far each update moved the policy on its own samples, steps}; {} for a run
    without them (FeedME, DPO, TRL's RLOO and GRPO)."""
    rows = [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("policy/clipfrac") is not None][:steps]
    if not rows:
        return {}
    return {"clipfrac": _mean([r["policy/clipfrac"] for r in rows]),
            "approxkl": _mean([r.get("policy/approxkl") for r in rows if r.get("policy/approxkl") is not None]),
            "steps": len(rows)}


def budget_of(run_dir: Path) -> dict:
    """The manifest's budget counters and compute."""
    m = _json(run_dir / "manifest.json", missing=True) or {}
    return {"status": m.get("status"), **{k: m.get(k) for k in BUDGET_KEYS},
            "wall_time_s": m.get("wall_time_s"), "manifest": m}


# runs.json of ablations older than the registry record a `family`
_FAMILY_GROUP = {"feedme": SELECTION, "ppo": ONLINE}


def _group(run: dict) -> str | None:
    return run.get("group") or _FAMILY_GROUP.get(run.get("family"))


def curve_rows(run_dir: Path) -> list[dict]:
    """One run's along-training evaluations: the rows of its metrics.jsonl with frontier/* (collapse_lab/evaluation/frontier.py)."""
    return [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("frontier/kl") is not None]


CURVE_KEYS = ("step", "budget/samples_scored") + KEYS + ("frontier/gold_gain",)


PER_PROMPT = ("frontier/kl/", "frontier/delta_norm_entropy/")  # each prompt's own point (matched.crossed)


def _suite_answers(run: dict, ids: set) -> dict:
    """{prompt id: answer probs} of a run on the prompts the closed forms were traced on: the seed suite's (its
    record), else the evaluator's file of the suite holding those prompts (world.curve_suite=heldout)."""
    answers = {pid: a["probs"] for pid, a in run["answers"].items() if pid in ids}
    if answers or not run.get("evals_dir"):
        return answers
    for path in sorted(Path(run["evals_dir"]).glob("*.json")):
        data = _json(path, missing=True) or {}
        found = {p["id"]: p["answer_probs"] for p in data.get("prompts", []) if p.get("id") in ids and "answer_probs" in p}
        if found:
            return found
    return {}


def _top_answer(answer_sets: list[dict]) -> tuple[Optional[str], Optional[float]]:
    """The answer with the largest p(a) averaged over prompts and seeds (missing = 0), and that mean."""
    total: dict[str, float] = {}
    n = 0
    for per_prompt in answer_sets:
        for a in per_prompt.values():
            n += 1
            for ans, p in zip(a["answers"], a["probs"]):
                total[ans] = total.get(ans, 0.0) + p
    if not total:
        return None, None
    best = max(sorted(total), key=lambda k: total[k])
    return best, total[best] / n


def _vocab(ablation: Path) -> int:
    return int(_json(ablation / "evals" / "base" / "seed.json")["summary"]["vocab_size"])


# the ablation directory's files are written by `collapse-lab ablate` (copies of the stages' own, whose damage the
# stage reports when the ablation finds it finished): rerunning it rewrites them, reusing every finished stage
REPAIR = "repair: rerun the collapse-lab ablate command that wrote this directory (finished stages are reused)"


def _json(path: Path, missing: bool = False):
    data = read_record(path, REPAIR, "json")
    if data is None and not missing:
        raise ConfigError(f"{path} is missing; {REPAIR}")
    return data


def _jsonl(path: Path) -> list[dict]:
    return read_record(path, REPAIR, "jsonl") or []


def _yaml(path: Path):
    return read_record(path, REPAIR, "yaml")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def collect(ablation: Path) -> tuple[dict, dict, dict[str, list[dict]], dict[str, str]]:
    """The stored results, read back: (ablation.yaml, the base's record, each regime's per-seed records with
    their Δ(H/log|A|) to the base and, where the control ran, to it, {regime: its control})."""
    ablation = Path(ablation)
    config = _yaml(ablation / "ablation.yaml")
    if config is None:
        raise ConfigError(f"{ablation / 'ablation.yaml'} is missing; {REPAIR}")
    index = _json(ablation / "runs.json")
    base = run_record(ablation / "evals" / "base")
    by_regime: dict[str, list[dict]] = {}
    for r in index["runs"]:
        rec = run_record(ablation / r["evals"])
        rec.update(seed=r["seed"], group=_group(r), recipe=r["recipe"], control_of=r.get("control_of"),
                   kl_coef=r.get("kl_coef"), adaptive_kl=r.get("adaptive_kl"), ent_coef=r.get("ent_coef"),
                   evals_dir=str(ablation / r["evals"]),
                   budget=budget_of(ablation / "runs" / r["regime"] / f"s{r['seed']}"),
                   early=early_updates(ablation / "runs" / r["regime"] / f"s{r['seed']}"),
                   lab=_yaml(ablation / "runs" / r["regime"] / f"s{r['seed']}" / "config.yaml"))
        rec["delta_norm_entropy"] = rec["norm_entropy"] - base["norm_entropy"]
        rec["delta_prompts"] = [rec["per_prompt"][k]["norm_entropy"] - base["per_prompt"][k]["norm_entropy"]
                                for k in rec["per_prompt"]]
        by_regime.setdefault(r["regime"], []).append(rec)
    # each regime's control, when it ran: sft -> sft-random (runs.json's control_of)
    control = {runs[0]["control_of"]: name for name, runs in by_regime.items()
               if runs[0].get("control_of") in by_regime}
    for name, ctrl in control.items():
        at = {x["seed"]: x for x in by_regime[ctrl]}
        for rec in by_regime[name]:
            if rec["seed"] in at:
                rec["delta_norm_entropy_control"] = rec["norm_entropy"] - at[rec["seed"]]["norm_entropy"]

    return config, base, by_regime, control
