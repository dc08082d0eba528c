"""The ablation's report: a pure function of an ablation directory's stored results.

    build(dir) reads   ablation.yaml (the config and the collapse rule), runs.json,
                       evals/<regime>/s<seed>/{seed,arithmetic,stories,gold}.json (the evaluator),
                       runs/<stage>/s<seed>/{manifest.json,metrics.jsonl} (budgets, training curves)
               writes  report.json, report.md, plots/*.png   (nothing typed by hand)

Statistics. Per regime, each metric is averaged over the seed prompts within a run, then
summarised ACROSS SEEDS as mean and a t-interval, mean ± t(1-(1-c)/2, n-1)·s/√n (c = the
rule's confidence, 0.95). With one seed there is no across-seed interval; the collapse test then
uses the interval across the five prompts instead, and says so.

The collapse rule (also stated in report.md): d = mean over the seed prompts of H/log|A|,
regime minus base, per seed; `collapsed` iff mean(d) < -threshold and the interval's upper end
is below 0. A regime whose finite-sample control ran too (runs.json `control_of`: sft-random for
sft, SFT on as many randomly chosen base samples) must also meet it on d_c = d - d(control), paired
by seed (one seed: by prompt); the control's own row is shown, marked, and not judged. The verdict
compares every PPO regime with a KL penalty (beta > 0 or adaptive) with FeedME (sft) by the paired
difference of d across seeds (seeds share their ratings), at the rating budgets their manifests record;
a comparison whose budgets differ is flagged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from collapse_lab.evaluation import frontier, metrics, matched as matched_lib, reference_curves as rc
from collapse_lab.lab.budget import compare as compare_budgets
from collapse_lab.evaluation.evaluator import plot_suite
from collapse_lab.evaluation.metrics import interval
from collapse_lab.regimes.registry import REGIMES
from collapse_lab.stages.stage import OFFLINE, ONLINE, SELECTION, get_dotted
from collapse_lab.core.config import ConfigError, read_record

# (key in a run's record, label, format): the per-regime numbers, in table order.
COLLAPSE_METRICS = [
    ("norm_entropy", "H / log|A|", ".3f"),
    ("answer_entropy", "H (nats)", ".3f"),
    ("delta_norm_entropy", "Δ(H/log|A|) vs base", "+.3f"),
    ("delta_norm_entropy_control", "Δ(H/log|A|) vs control", "+.3f"),
    ("valid_mass", "valid mass M", ".3f"),
    ("top_prob", "top p(a)", ".3f"),
    ("entropy_upper_bound", "post's bound (nats)", ".2f"),
    ("next_token_entropy", "next-token H (nats)", ".2f"),
    ("kl_to_reference", "KL to base (nats)", ".4f"),
    ("tv_to_reference", "TV", ".3f"),
    ("abs_entropy_change", "|ΔH| (nats)", ".3f"),
    ("fannes_entropy_bound", "Fannes bound (nats)", ".3f"),
    ("within_bound", "|ΔH| ≤ bound (share)", ".2f"),
    # PPO runs: the closed-form optimum π* of the run's own objective (β, α) with the GOLD rater's mean
    # score (collapse_lab/evaluation/optimum.py); for reward=rm runs, how far the learned reward led from it
    ("optimum_tv", "TV to own π* (gold)", ".3f"),
    ("optimum_norm_entropy", "π*: H/log|A|", ".3f"),
]
DIVERSITY_METRICS = [
    ("sequence_entropy", "seq. entropy (nats)", ".2f"),
    ("distinct_1", "distinct-1", ".3f"),
    ("distinct_2", "distinct-2", ".3f"),
    ("repetition_loop_rate", "repetition loops", ".3f"),
    ("well_formed_rate", "well-formed", ".3f"),
    ("stories.sequence_entropy", "stories seq. H (nats)", ".1f"),
    ("stories.distinct_2", "stories distinct-2", ".3f"),
    ("stories.repetition_loop_rate", "stories loops", ".3f"),
    ("ece", "ECE", ".3f"),
    ("brier", "Brier", ".3f"),
    ("gold_reward", "gold reward (1-7)", ".2f"),
]
# the same exact metrics on TRAINED-ON prompts (eval/suites/templates.yaml: prompts World.train_prompt draws),
# beside the seed suite's (held out of fine-tuning when world.heldout_eval_prompts): means over its prompts
TRAINED_METRICS = [
    ("trained.norm_entropy", "H / log|A|", ".3f"),
    ("trained.delta_norm_entropy", "Δ(H/log|A|) vs base", "+.3f"),
    ("trained.kl_to_reference", "KL to base (nats)", ".4f"),
    ("trained.tv_to_reference", "TV", ".3f"),
    ("trained.top_prob", "top p(a)", ".3f"),
    ("trained.valid_mass", "valid mass M", ".3f"),
    ("trained.optimum_tv", "TV to own π* (gold)", ".3f"),
]
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
    if k == "gold_reward":
        return (1.0, 7.0)
    return None
# the report's intro, by the runs' world.heldout_eval_prompts
HELDOUT_TEXT = {
    True: "Evaluation prompts: the seed suite's five prompts were HELD OUT of every fine-tuning stage "
          "(`world.heldout_eval_prompts=true`; still in pretraining), so their numbers measure transfer to "
          "prompts fine-tuning never saw, as in the post; the templates suite's prompts were trained on.",
    False: "Evaluation prompts: the seed suite's five prompts were ALSO fine-tuning prompts "
           "(`world.heldout_eval_prompts=false`): their numbers include fitting those very prompts.",
    "mixed": "Evaluation prompts: the runs disagree on `world.heldout_eval_prompts` (some kept the seed "
             "prompts out of fine-tuning, some did not).",
}
# the templates suite's heading and line, by whether fine-tuning drew from the template prompts
TEMPLATES_TEXT = {
    True: ["## Trained-on prompts (templates suite)", "",
           "Five of the world's template prompts (`eval/suites/templates.yaml`), which fine-tuning draws from: "
           "means over them, exact answer distributions."],
    False: ["## Held-out prompts (templates suite)", "",
            "Five of the world's template prompts (`eval/suites/templates.yaml`), which fine-tuning did NOT draw "
            "from (`world.train_seed_share=1`: every fine-tuning number prompt was a seed prompt): transfer to "
            "other prompts and ranges; means over them, exact answer distributions."],
    "mixed": ["## Template prompts (templates suite)", "",
              "Five of the world's template prompts (`eval/suites/templates.yaml`); the runs disagree on whether "
              "fine-tuning drew from them (`world.heldout_eval_prompts`, `world.train_seed_share`)."],
}


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


# ----------------------------------------------------------------------------- statistics


def collapse_test(d_seeds: list[float], d_prompts: list[float], threshold: float, confidence: float) -> dict:
    """The collapse rule on d = Δ(H/log|A|) vs base: per seed (≥ 2 seeds) or, with one seed, per prompt."""
    across = "seeds" if len(d_seeds) >= 2 else "prompts"
    ci = interval(d_seeds if across == "seeds" else d_prompts, confidence)
    collapsed = ci["mean"] is not None and ci["hi"] is not None and ci["mean"] < -threshold and ci["hi"] < 0
    return {**ci, "across": across, "collapsed": bool(collapsed)}


def regime_collapse(runs: list[dict], control_runs: list[dict] | None, threshold: float, confidence: float) -> dict:
    """One regime's call: the rule on d vs base, and with its control's runs (same seeds) ALSO on
    d_c = d - d(control) = Δ(H/log|A|) regime minus control, paired by seed (one seed: by prompt)."""
    vs_base = collapse_test([x["delta_norm_entropy"] for x in runs],
                            list(np.mean([x["delta_prompts"] for x in runs], axis=0)), threshold, confidence)
    ctrl = {x["seed"]: x for x in control_runs or []}
    paired = [(x, ctrl[x["seed"]]) for x in runs if x["seed"] in ctrl]
    tests = [vs_base]
    if paired:
        tests.append(collapse_test([x["delta_norm_entropy"] - c["delta_norm_entropy"] for x, c in paired],
                                   list(np.mean([np.subtract(x["delta_prompts"], c["delta_prompts"])
                                                 for x, c in paired], axis=0)), threshold, confidence))
    collapsed = all(t["collapsed"] for t in tests)
    # a mean drop beyond the threshold whose interval still reaches 0: not called, not cleared either
    beyond = all(t["mean"] is not None and t["mean"] < -threshold for t in tests)
    return {"collapse_test": vs_base, "collapse_test_control": tests[1] if paired else None, "collapsed": collapsed,
            "call": "collapsed" if collapsed else "inconclusive" if beyond else "not collapsed"}


# ------------------------------------------------------------------------- one run's record


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


def budget_of(run_dir: Path) -> dict:
    """The manifest's budget counters and compute."""
    m = _json(run_dir / "manifest.json", missing=True) or {}
    return {"status": m.get("status"), **{k: m.get(k) for k in BUDGET_KEYS},
            "wall_time_s": m.get("wall_time_s"), "manifest": m}


def budgets_matched(a: dict, b: dict) -> tuple[bool, str]:
    """Do two runs spend the same RATING BUDGET? (collapse_lab.lab.budget's rule on their manifests.)"""
    matched, message = compare_budgets(a["manifest"], b["manifest"])
    return bool(matched), str(message)


# runs.json of ablations older than the registry record a `family`
_FAMILY_GROUP = {"feedme": SELECTION, "ppo": ONLINE}


def _group(run: dict) -> str | None:
    return run.get("group") or _FAMILY_GROUP.get(run.get("family")) or getattr(REGIMES.get(run["regime"]), "group", None)


# ------------------------------------------------------------------------------- the report


def build(ablation: Path, write: bool = True) -> dict:
    """report.json / report.md / plots from the ablation directory alone; returns the report."""
    ablation = Path(ablation)
    config = _yaml(ablation / "ablation.yaml")
    if config is None:
        raise ConfigError(f"{ablation / 'ablation.yaml'} is missing; {REPAIR}")
    acfg = config["ablate"]
    threshold, confidence = float(acfg["collapse"]["threshold"]), float(acfg["collapse"]["confidence"])
    index = _json(ablation / "runs.json")
    base = run_record(ablation / "evals" / "base")
    by_regime: dict[str, list[dict]] = {}
    for r in index["runs"]:
        rec = run_record(ablation / r["evals"])
        rec.update(seed=r["seed"], group=_group(r), recipe=r["recipe"], control_of=r.get("control_of"),
                   evals_dir=str(ablation / r["evals"]),
                   budget=budget_of(ablation / "runs" / r["regime"] / f"s{r['seed']}"),
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

    regimes = {}
    for name, runs in by_regime.items():
        runs.sort(key=lambda x: x["seed"])
        metrics_ = {key: interval([x.get(key) for x in runs], confidence, bounds_of(key))
                    for key, _, _ in COLLAPSE_METRICS + DIVERSITY_METRICS + TRAINED_METRICS}
        per_prompt = {pid: interval([x["per_prompt"][pid]["answer_entropy"] for x in runs], confidence)
                      for pid in runs[0]["per_prompt"]}
        top, top_p = _top_answer([x["answers"] for x in runs])
        call = regime_collapse(runs, by_regime.get(control.get(name)), threshold, confidence)
        control_of = runs[0].get("control_of")
        budget = {k: interval([x["budget"][k] for x in runs if x["budget"][k] is not None], confidence)
                  for k in BUDGET_KEYS}
        lab = runs[0]["lab"] or {}
        regime = REGIMES.get(name)  # its registry entry: which config key holds its KL coefficient
        regimes[name] = {
            "group": runs[0]["group"], "recipe": runs[0]["recipe"], "seeds": [x["seed"] for x in runs],
            "kl_coef": regime.kl_coef(lab) if regime else None,
            "adaptive_kl": regime.adaptive_kl(lab) if regime else None,
            "ent_coef": get_dotted(lab, "ppo.ent_coef") if regime and regime.kl_key == "ppo.kl_coef" else None,
            "metrics": metrics_, "answer_entropy_per_prompt": per_prompt, "top_answer": top, "top_prob": top_p,
            "control": control.get(name), "control_of": control_of, **call,
            "collapsed": None if control_of else call["collapsed"], "call": None if control_of else call["call"],
            "budget": budget,
            "status": sorted({str(x["budget"]["status"]) for x in runs}),
        }
    base_top, base_top_p = _top_answer([base["answers"]])
    base_out = {"metrics": {key: base.get(key) for key, _, _ in COLLAPSE_METRICS + DIVERSITY_METRICS + TRAINED_METRICS
                            if not key.startswith("delta_norm_entropy")},
                "answer_entropy_per_prompt": {k: v["answer_entropy"] for k, v in base["per_prompt"].items()},
                "top_answer": base_top, "top_prob": base_top_p}
    comparisons = compare(by_regime, regimes, confidence, threshold)
    fr = frontier_section(ablation, by_regime, regimes, acfg.get("frontier") or {}, confidence)
    for name, runs in by_regime.items():
        regimes[name]["gold_gain"] = gold_gain(runs, base, confidence, fr["curves"].get(name))
    closed = closed_forms_section(ablation, by_regime, regimes, fr)
    compute = {name: {"wall_time_s": interval([x["budget"]["wall_time_s"] for x in runs
                                               if x["budget"]["wall_time_s"] is not None], confidence)["mean"]}
               for name, runs in by_regime.items()}
    rule = (f"iff the mean over seeds of d = Δ(H/log|A|) (mean over the seed prompts, regime minus "
            f"base) is below -{threshold:g} AND the upper end of its {confidence:.0%} t-interval is below 0 "
            f"(interval across seeds; with one seed, across the prompts); a regime with a finite-sample control in "
            f"the ablation (sft-random for sft: SFT on as many base samples per prompt, chosen at random from the "
            f"same ratings) must ALSO meet that rule on its paired Δ(H/log|A|) vs the control, so a drop that "
            f"fitting a finite sample causes without any selection is not called collapse (the control itself is "
            f"shown, not judged). PPO with a KL penalty 'collapses less' "
            f"than FeedME when the paired difference of d (PPO minus FeedME) has its interval above 0 and a mean "
            f"of at least {threshold:g}")
    runs = [x["lab"] or {} for rs in by_regime.values() for x in rs]
    heldout = {bool(get_dotted(lab, "world.heldout_eval_prompts")) for lab in runs}
    templates = {templates_trained_on(lab) for lab in runs}
    report = {"ablation": str(ablation), "config": config, "rule": rule, "base": base_out, "regimes": regimes,
              "comparisons": comparisons, "frontier": fr, "closed_forms": closed, "compute": compute,
              "preference_strength": get_dotted(next(iter(by_regime.values()))[0]["lab"] or {},
                                          "world.rater.preference_strength") if by_regime else None,
              # were the seed prompts kept out of fine-tuning? true / false, "mixed" when the runs disagree
              "heldout_eval_prompts": heldout.pop() if len(heldout) == 1 else "mixed" if heldout else None,
              # did fine-tuning draw from the template prompts? (the templates suite's heading)
              "templates_trained": templates.pop() if len(templates) == 1 else "mixed" if templates else None}
    floor = float((acfg.get("frontier") or {}).get("gain_floor", 0.02))
    for r in regimes.values():
        r["no_gold_gain"] = no_gold_gain(r, floor)
    rm = [_json(m) for m in sorted((ablation / "runs" / "reward_model").glob("s*/manifest.json"))]
    report["reward_model"] = {k: interval([m.get(k) for m in rm], confidence)  # the reward model's quality
                              for k in ("eval_pairwise_accuracy", "eval_spearman_gold")} if rm else None
    report["verdict"] = verdict(report)
    if write:
        plots = make_plots(ablation, base, by_regime, report)
        report["plots"] = [str(p.relative_to(ablation)) for p in plots]
        (ablation / "report.json").write_text(json.dumps(_jsonable(report), indent=1, sort_keys=True) + "\n")
        (ablation / "report.md").write_text(markdown(report))
    return report


def compare(by_regime: dict, regimes: dict, confidence: float, threshold: float = 0.0) -> list[dict]:
    """Each KL-regularised regime (online RL with β > 0 or adaptive: PPO, RLOO, GRPO; offline preference:
    DPO, IPO) vs each selection regime (FeedME, best-of-k; not controls): paired difference of d across
    seeds (positive: the KL-regularised regime keeps more answer entropy), and whether their rating budgets
    match. It collapses less (more) when the difference's interval is above (below) 0 AND its mean is at
    least `threshold` (the collapse rule's) in size."""
    out = []
    kl = [n for n, r in regimes.items() if r["group"] in (ONLINE, OFFLINE) and ((r["kl_coef"] or 0) > 0 or r["adaptive_kl"])]
    selection = [n for n, r in regimes.items() if r["group"] == SELECTION and not r.get("control_of")]
    for f in selection:
        for p in kl:
            fr = {x["seed"]: x for x in by_regime[f]}
            pr = {x["seed"]: x for x in by_regime[p]}
            seeds = sorted(set(fr) & set(pr))
            if len(seeds) >= 2:
                diff, across = interval([pr[s]["delta_norm_entropy"] - fr[s]["delta_norm_entropy"] for s in seeds],
                                        confidence), "seeds"
            else:
                s = seeds[0]
                diff, across = interval(list(np.subtract(pr[s]["delta_prompts"], fr[s]["delta_prompts"])),
                                        confidence), "prompts"
            matched = [budgets_matched(pr[s]["budget"], fr[s]["budget"]) for s in seeds]
            # significant (interval excludes 0) AND as large as the collapse threshold: a difference of
            # 0.001 of log|A| with a tight interval is not "collapsing less"
            less = diff["lo"] is not None and diff["lo"] > 0 and diff["mean"] >= threshold
            more = diff["hi"] is not None and diff["hi"] < 0 and diff["mean"] <= -threshold
            out.append({"regime": p, "group": regimes[p]["group"], "selection": f, "difference": diff, "across": across,
                        "collapses_less": bool(less), "collapses_more": bool(more),
                        "budget_matched": all(m for m, _ in matched),
                        "budget_message": "; ".join(sorted({msg for _, msg in matched}))})
    return out


def gold_gain(runs: list[dict], base: dict, confidence: float, curves: Optional[dict] = None) -> dict:
    """The regime's gold-reward gain over the base on the seed prompts. With curves along training: EXACT, the
    rater's mean score of the answer distribution normalised over the answers (frontier/gold_gain at the run's
    last point: what a preference can raise, not validity or ending), per seed, an interval across seeds.
    Otherwise (best-of-k, old ablations) the evaluator's SAMPLED noiseless gold score minus the base's: across
    seeds, or with one seed across the prompts. `source` and `across` say which."""
    if curves:
        ends = [rows[-1]["frontier/gold_gain"] for rows in curves.values() if rows]
        return {**interval(ends, confidence), "across": "seeds", "source": "exact"}
    if len(runs) >= 2:
        return {**interval([x["gold_reward"] - base["gold_reward"] for x in runs
                            if x.get("gold_reward") is not None and base.get("gold_reward") is not None], confidence),
                "across": "seeds", "source": "sampled"}
    x = runs[0]
    if not x.get("gold_prompts") or len(x["gold_prompts"]) != len(base.get("gold_prompts") or []):
        return {**interval([], confidence), "across": "prompts", "source": "sampled"}
    return {**interval(list(np.subtract(x["gold_prompts"], base["gold_prompts"])), confidence), "across": "prompts",
            "source": "sampled"}


def no_gold_gain(regime: dict, floor: float) -> bool:
    """A judged regime whose answer entropy dropped (called collapsed, or inconclusive) with NO gold-reward gain:
    the gain's mean below `floor` (rating points) or its interval reaching 0. Not preference-driven collapse: a
    reward-trained regime followed its reward's errors (over-optimising the reward model); FeedME carried over
    what its training prompts selected for."""
    if regime.get("control_of") or regime.get("call") == "not collapsed":
        return False
    g = regime.get("gold_gain") or {}
    if g.get("mean") is None:
        return False
    return bool(g["mean"] < floor or (g.get("lo") is not None and g["lo"] <= 0))


def curve_rows(run_dir: Path) -> list[dict]:
    """One run's along-training evaluations: the rows of its metrics.jsonl with frontier/* (collapse_lab/evaluation/frontier.py)."""
    return [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("frontier/kl") is not None]


CURVE_KEYS = ("step", "budget/samples_scored") + frontier.KEYS + ("frontier/gold_gain",)
PER_PROMPT = ("frontier/kl/", "frontier/delta_norm_entropy/")  # each prompt's own point (matched.crossed)


def frontier_section(ablation: Path, by_regime: dict, regimes: dict, rule: dict, confidence: float) -> dict:
    """The comparison at MATCHED distance: every regime's curves (per seed), the base's exact reference curves
    (evals/base/reference_curves.json), and for each KL-regularised regime (β > 0 or adaptive) against each
    FeedME regime with curves, the paired difference of d = Δ(H/log|A|) at matched KL and at matched gold gain
    (frontier.matched), with its call (frontier.equivalence_call; `rule`: ablate.frontier)."""
    margin, grid_points = float(rule.get("margin", 0.02)), int(rule.get("grid_points", 8))
    curves = {}
    for name, runs in by_regime.items():
        per_seed = {x["seed"]: curve_rows(ablation / "runs" / name / f"s{x['seed']}") for x in runs}
        per_seed = {s: [{k: v for k, v in row.items() if k in CURVE_KEYS or k.startswith(PER_PROMPT)} for row in rows]
                    for s, rows in per_seed.items() if rows}
        if per_seed:
            curves[name] = per_seed
    kl = [n for n in curves if regimes[n]["group"] in (ONLINE, OFFLINE)
          and ((regimes[n]["kl_coef"] or 0) > 0 or regimes[n]["adaptive_kl"])]
    feedme = [n for n in curves if regimes[n]["group"] == SELECTION and not regimes[n].get("control_of")]
    comparisons = []
    for f in feedme:
        for n in kl:
            for x in ("frontier/kl", "frontier/gold_gain"):
                points = [{s: frontier.curve_points(rows, x) for s, rows in curves[r].items()} for r in (n, f)]
                m = frontier.matched(*points, grid_points, confidence, sqrt_x=x == "frontier/kl")
                cross = matched_lib.crossed(curves[n], curves[f], grid_points, confidence) if x == "frontier/kl" else None
                row = {"regime": n, "group": regimes[n]["group"], "feedme": f, "x": x.split("/")[1],
                       **(m or {"difference": interval([]), "x_min": None, "x_max": None, "seeds": [], "grid": []}),
                       "crossed": cross, "call": "no common range" if m is None else
                       frontier.equivalence_call(m["difference"], margin)}
                if cross and rule.get("random_prompts"):  # the call on the seeds x prompts interval
                    row["pooled_difference"], row["difference"] = row["difference"], cross["difference"]
                    row["call"] = frontier.equivalence_call(cross["difference"], margin)
                comparisons.append(row)
    return {"margin": margin, "grid_points": grid_points, "curves": curves, "comparisons": comparisons,
            "primary": rule.get("primary"), "random_prompts": bool(rule.get("random_prompts")),
            "references": _json(ablation / "evals" / "base" / "reference_curves.json", missing=True) or {}}


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


def closed_forms_section(ablation: Path, by_regime: dict, regimes: dict, fr: dict) -> dict:
    """What the closed forms predict (collapse_lab/evaluation/reference_curves.py, numpy only): the base's reference families
    (best-of-k, FeedME's expected selection, π*_β, π*_{β,α}), their largest separation at matched KL within the
    tested range, per frontier comparison the predicted D and call beside the measured one and the interpolation
    artefact (every measured point moved onto the π*_β curve: |D| must be ≤ 0.002), and per regime the TV of its
    end point to its own closed form (reward=rm: to the reward model's exact π* too). {} without the base's data."""
    refs = fr.get("references") or {}
    if not (refs.get("base") or {}).get("prompts"):
        return {}
    forms = rc.forms_from_json(refs["base"])
    labs = {n: (runs[0].get("lab") or {}) for n, runs in by_regime.items()}
    specs = {n: rc.own_closed_form({**regimes[n], "name": n}, labs[n]) for n in regimes}
    ks = sorted({s["k"] for s in specs.values() if s and s["kind"] == "feedme"}) or [
        int(get_dotted(next(iter(labs.values()), {}), "ratings.samples_per_prompt") or 4)]
    alphas = sorted({s["alpha"] for s in specs.values() if s and s["kind"] == "optimum" and s["alpha"] > 0})
    measured = [r["frontier/kl"] for per_seed in fr["curves"].values() for rows in per_seed.values() for r in rows
                if r.get("frontier/kl") is not None]
    tested = min(rc.KL_MAX, max(measured)) if measured else rc.KL_MAX
    fams = rc.reference_families(forms, ks[0], alphas)
    for k in ks[1:]:
        fams[f"feedme_k{k}"] = rc.feedme_curve(forms, k)
    pairs = [("best_of_k", "optimum_beta"), ("feedme", "optimum_beta"), ("feedme", "best_of_k")]
    separations = [{"a": a, "b": b, **rc.separation(fams[a], fams[b], tested)} for a, b in pairs]
    family_of = lambda n: None if specs.get(n) is None else (  # noqa: E731
        fams.get(f"feedme_k{specs[n]['k']}", fams["feedme"]) if specs[n]["kind"] == "feedme"
        else rc.reference_for(specs[n], fams))
    opt = fams["optimum_beta"]
    on_opt = lambda x: float(rc.d_at(opt, [x])[0])  # noqa: E731
    predictions = []
    for c in fr["comparisons"]:
        x = "kl" if c["x"] == "kl" else "gold_gain"
        a, b = family_of(c["regime"]), family_of(c["feedme"])
        pred = rc.predicted_difference(a, b, c.get("grid"), x) if a and b else None
        row = {"regime": c["regime"], "feedme": c["feedme"], "x": c["x"], "predicted_difference": pred,
               "predicted_call": rc.predicted_call(pred, fr["margin"]), "measured_call": c["call"]}
        if c["x"] == "kl":
            pts = [{s: matched_lib.curve_points(rows) for s, rows in fr["curves"].get(r, {}).items()}
                   for r in (c["regime"], c["feedme"])]
            row["artefact_difference"] = matched_lib.artefact_difference(*pts, on_opt, fr["grid_points"])
        predictions.append(row)
    rm = {int(p.parent.name[1:]): _json(p) for p in (ablation / "runs" / "reward_model").glob("s*/answer_scores.json")}
    track = {}
    for n, runs in by_regime.items():
        if specs.get(n) is None:
            continue
        answers = {x["seed"]: _suite_answers(x, {f.id for f in forms}) for x in runs}
        track[n] = {"closed_form": specs[n], **rc.tracking(forms, specs[n], answers, rm)}
    for row in predictions:
        left = [r for r in (row["regime"], row["feedme"]) if track.get(r, {}).get("tracks") is False]
        unknown = [r for r in (row["regime"], row["feedme"]) if r not in track or track[r].get("tracks") is None]
        if row["measured_call"] in ("no common range", "one seed: no call") or row["predicted_difference"] is None:
            row["agrees"], row["reading"] = None, "nothing to compare (no measured call or no prediction)"
            continue
        agree = row["predicted_call"] == row["measured_call"]
        row["agrees"] = agree
        row["reading"] = ("agrees" if agree else
                          f"disagrees: {', '.join(left)} left its closed form (TV > {rc.TRACKING_TV:g})" if left else
                          f"disagrees: no closed form to check for {', '.join(unknown)}" if unknown else
                          "disagrees although both regimes track their closed forms: the measured comparison or a "
                          "closed form is wrong")
    return {"kl_tested": tested, "separations": separations, "families": {k: rc.thin(v) for k, v in fams.items()},
            "predictions": predictions, "tracking": track, "tracking_tv": rc.TRACKING_TV}


def matched_answer(report: dict) -> str:
    """The verdict's first question: at matched KL to the base, does KL-penalised online RL keep more entropy
    than FeedME? From the frontier's KL comparisons of the online RL regimes."""
    comps = [c for c in report["frontier"]["comparisons"] if c["x"] == "kl" and c["group"] == ONLINE]
    primary = report["frontier"].get("primary")
    if primary:  # one pre-registered pair: the others are secondary
        comps = [c for c in report["frontier"]["comparisons"] if c["x"] == "kl" and f"{c['regime']}:{c['feedme']}" == primary]
        if not comps:
            return f"NOT TESTED: the primary pair {primary} has no comparison at matched KL"
    m = report["frontier"]["margin"]
    calls = {c["call"] for c in comps}
    if not comps:
        return "NOT TESTED: no KL-penalised online RL regime and FeedME both with curves along training"
    if "one seed: no call" in calls:
        return "NO CALL: one seed (an interval across seeds needs two or more; run seeds=3)"
    if calls == {"more entropy"}:
        return "YES: every KL-penalised online RL regime keeps more answer entropy than FeedME at the same KL"
    if calls == {"no difference"}:
        return (f"NO DIFFERENCE: within ±{m:g} of log|A| at the same KL, KL-penalised online RL and FeedME lose "
                "the same entropy (they move along one curve)")
    if "less entropy" in calls:
        return "NO: some KL-penalised online RL regime keeps LESS entropy than FeedME at the same KL"
    return "UNDECIDED: " + "; ".join(f"{c['regime']} vs {c['feedme']}: {c['call']}" for c in comps)


def predicted_sentence(report: dict) -> str:
    """The closed forms' call beside the measured one for the KL pairs the first question rests on, with the power."""
    fr, cf = report.get("frontier") or {}, report.get("closed_forms") or {}
    if not cf.get("predictions"):
        return ""
    primary = fr.get("primary")
    preds = [p for p in cf["predictions"] if p["x"] == "kl" and (not primary or f"{p['regime']}:{p['feedme']}" == primary)]
    parts = [f"{p['regime']} vs {p['feedme']}: closed forms predict '{p['predicted_call']}' (D "
             f"{_cell(p['predicted_difference'], '+.4f')}), measured '{p['measured_call']}' ({p['reading']}; interpolation "
             f"artefact {_cell(p.get('artefact_difference'), '+.5f')})" for p in preds]
    return (" " + "; ".join(parts) + ". " + power_statement({**fr, "comparisons": [
        c for c in fr.get("comparisons", []) if not primary or f"{c['regime']}:{c['feedme']}" == primary]})) if parts else ""


def verdict(report: dict) -> dict:
    """The paragraph answering the post's question, computed from the table."""
    regimes = report["regimes"]
    judged = {n: r for n, r in regimes.items() if not r.get("control_of")}
    call = lambda r: r.get("call") or ("collapsed" if r["collapsed"] else "not collapsed")  # noqa: E731
    collapsed = [n for n, r in judged.items() if call(r) == "collapsed"]
    unclear = [n for n, r in judged.items() if call(r) == "inconclusive"]
    fine = [n for n, r in judged.items() if call(r) == "not collapsed"]
    t = report["config"]["ablate"]["collapse"]["threshold"]
    pref = report.get("preference_strength")
    lines = [f"Collapsed (rule: mean Δ(H/log|A|) below -{t:g} with the interval below 0, vs the base and, where a "
             f"finite-sample control ran, vs that control too): {', '.join(collapsed) or 'none'}. "
             + (f"Inconclusive (mean below -{t:g} but the interval reaches 0: the seeds disagree; run more "
                f"seeds): {', '.join(unclear)}. " if unclear else "")
             + f"Not collapsed: {', '.join(fine) or 'none'}."
             + (f" Rater preference strength: {pref:g}." if pref is not None else "")]
    for name, r in judged.items():
        if r.get("control") and r.get("collapse_test_control"):
            b, c = r["collapse_test"], r["collapse_test_control"]
            lines.append(f"{name} vs base: Δ(H/log|A|) {_fmt(b, '+.3f')}; vs its control {r['control']} (as many "
                         f"base samples per prompt, picked at random, not by score): {_fmt(c, '+.3f')} (intervals "
                         f"across {c['across']}); {'both' if b['collapsed'] and c['collapsed'] else 'not both'} "
                         f"below -{t:g} with the interval below 0.")
    for name in collapsed + unclear:
        r = regimes[name]
        lines.append(f"{name}: H/log|A| {_fmt(r['metrics']['norm_entropy'])} "
                     f"(base {report['base']['metrics']['norm_entropy']:.3f}), top answer {r['top_answer']!r} "
                     f"at {r['top_prob']:.1%}.")
    answer = "not tested (no FeedME or no KL-penalised online RL regime in this ablation)"
    if report["comparisons"]:
        parts = []
        for c in report["comparisons"]:
            word = ("less than" if c["collapses_less"] else "MORE than" if c["collapses_more"]
                    else "not distinguishably differently from")
            flag = "" if c["budget_matched"] else f" [BUDGETS NOT MATCHED: {c['budget_message']}]"
            parts.append(f"{c['regime']} ({c['group']}) collapses {word} {c['selection']} (paired difference of "
                         f"Δ(H/log|A|) {_fmt(c['difference'], '+.3f')} across {c['across']}){flag}")
        lines.append("; ".join(parts) + ".")
    # the post's question: RLHF (online RL with a KL penalty: PPO, RLOO, GRPO) against FeedME
    comps = [c for c in report["comparisons"] if c["group"] == ONLINE]
    if comps:
        matched = [c for c in comps if c["budget_matched"]]
        sft_collapsed = any(regimes[c["selection"]]["collapsed"] for c in matched)
        any_drop = any(call(regimes[c[k]]) != "not collapsed" for c in matched for k in ("selection", "regime"))
        if not matched:
            answer = "UNDECIDED: no comparison has matched rating budgets"
        elif all(c["across"] == "prompts" for c in matched):  # the five prompts are not replicates
            answer = "NO CALL: one seed (the differences above are across prompts, which are not replicates)"
        elif all(c["collapses_less"] for c in matched) and sft_collapsed:
            answer = "YES: every KL-penalised online RL regime keeps more answer entropy than FeedME at a matched budget"
        elif any(c["collapses_more"] for c in matched):
            answer = "NO: at a matched budget some KL-penalised online RL regime collapses MORE than FeedME"
        elif not any_drop:
            answer = "NOT APPLICABLE here: neither FeedME nor KL-penalised online RL collapses"
        else:
            answer = ("MIXED / not significant: the intervals do not separate every KL-penalised online RL regime "
                      "from FeedME")
    lines.append(f"Second, at the END points with a matched rating budget: does RLHF with a KL penalty (PPO, RLOO, "
                 f"GRPO) collapse less than FeedME? {answer}.")
    flagged = [n for n, r in judged.items() if r.get("no_gold_gain")]
    if flagged:
        lines.append(f"Entropy dropped with no gold-reward gain on these prompts, so NOT preference-driven collapse "
                     f"(reward-trained: over-optimising the reward model; FeedME: what its training prompts selected "
                     f"for, carried over): {', '.join(flagged)}.")
    first = matched_answer(report) if report.get("frontier") else "NOT TESTED: no frontier section"
    lines.insert(0, f"First, at MATCHED distance: at the same KL to the base, does KL-penalised online RL (PPO, "
                    f"RLOO, GRPO) keep more answer entropy than FeedME? {first}." + predicted_sentence(report))
    return {"collapsed": collapsed, "inconclusive": unclear, "not_collapsed": fine, "answer": first,
            "endpoint_answer": answer, "no_gold_gain": flagged, "text": " ".join(lines)}


# ------------------------------------------------------------------------------- markdown


def markdown(report: dict) -> str:
    regimes, base = report["regimes"], report["base"]
    c = report["config"]["ablate"]
    md = [f"# Ablation report: `{Path(report['ablation']).name}`", "",
          f"Generated by `collapse-lab report {report['ablation']}` from the stored results alone. "
          f"Preset `{c['preset']}`, seeds {c['seed']}..{c['seed'] + c['seeds'] - 1}, regimes {', '.join(regimes)}; "
          f"lab overrides: `{' '.join(report['config']['lab']) or '(none)'}`. Means over seeds with "
          f"{c['collapse']['confidence']:.0%} t-intervals across seeds in brackets (none with one seed).", "",
          *([HELDOUT_TEXT[report["heldout_eval_prompts"]], ""] if report.get("heldout_eval_prompts") in HELDOUT_TEXT else []),
          "## Verdict", "", report["verdict"]["text"], "",
          f"**Rule.** A regime is `collapsed` {report['rule']}.", "",
          "## Collapse (the post's five prompts, exact answer distributions)", ""]
    cols = ["regime", "collapsed"] + [label for _, label, _ in COLLAPSE_METRICS] + ["top answer (p)"]
    md += [_row(cols), _row(["---"] * len(cols))]
    md.append(_row(["base", "-"] + [_cell(base["metrics"].get(k), f) for k, _, f in COLLAPSE_METRICS]
                   + [f"{base['top_answer']!r} ({base['top_prob']:.3f})"]))
    for name, r in regimes.items():
        called = (f"control of {r['control_of']}" if r.get("control_of") else "**yes**" if r["collapsed"]
                  else "inconclusive" if r.get("call") == "inconclusive" else "no")
        md.append(_row([name, called]
                       + [_fmt(r["metrics"][k], f) for k, _, f in COLLAPSE_METRICS]
                       + [f"{r['top_answer']!r} ({r['top_prob']:.3f})"]))
    md += frontier_markdown(report)
    md += closed_forms_markdown(report)
    prompts = list(base["answer_entropy_per_prompt"])
    md += ["", "Answer entropy per seed prompt (nats; max log 101 = 4.62, log 100 = 4.61):", "",
           _row(["regime"] + prompts + ["mean"]), _row(["---"] * (len(prompts) + 2)),
           _row(["base"] + [f"{base['answer_entropy_per_prompt'][p]:.3f}" for p in prompts]
                + [f"{base['metrics']['answer_entropy']:.3f}"])]
    for name, r in regimes.items():
        md.append(_row([name] + [_fmt(r["answer_entropy_per_prompt"][p]) for p in prompts]
                       + [_fmt(r["metrics"]["answer_entropy"])]))
    if any(base["metrics"].get(k) is not None for k, _, _ in TRAINED_METRICS):
        md += ["", *TEMPLATES_TEXT.get(report.get("templates_trained"), TEMPLATES_TEXT[True]), ""]
        cols = ["regime"] + [label for _, label, _ in TRAINED_METRICS]
        md += [_row(cols), _row(["---"] * len(cols)),
               _row(["base"] + [_cell(base["metrics"].get(k), f) for k, _, f in TRAINED_METRICS])]
        for name, r in regimes.items():
            md.append(_row([name] + [_fmt(r["metrics"][k], f) for k, _, f in TRAINED_METRICS]))
    md += ["", "## Diversity, calibration, reward", ""]
    cols = ["regime"] + [label for _, label, _ in DIVERSITY_METRICS]
    md += [_row(cols), _row(["---"] * len(cols)),
           _row(["base"] + [_cell(base["metrics"].get(k), f) for k, _, f in DIVERSITY_METRICS])]
    for name, r in regimes.items():
        md.append(_row([name] + [_fmt(r["metrics"][k], f) for k, _, f in DIVERSITY_METRICS]))
    md += ["", "## Rating budget and compute", "",
           _row(["regime", "group", "samples scored (rating budget)", "gradient steps", "tokens trained",
                 "wall time (s)", "status"]), _row(["---"] * 7)]
    for name, r in regimes.items():
        b = r["budget"]
        md.append(_row([name, str(r["group"]) + (f" (control of {r['control_of']})" if r.get("control_of") else "")]
                       + [_cell(b[k]["mean"], ".0f") for k in BUDGET_KEYS]
                       + [_cell(report["compute"][name]["wall_time_s"], ".1f"), "/".join(r["status"])]))
    if report.get("reward_model"):
        q = report["reward_model"]
        md += ["", f"Reward model (reward=rm regimes' reward), on held-out prompt draws of its ratings: pairwise accuracy "
               f"{_fmt(q['eval_pairwise_accuracy'])}, Spearman with the gold rater {_fmt(q['eval_spearman_gold'])}."]
    for name, r in regimes.items():
        if r.get("control_of"):
            md += ["", (f"`{name}` is trained on the same ratings as `{r['control_of']}` (the same ratings "
                        f"stage): its rating budget is {r['control_of']}'s, spent on a random pick instead of the "
                        "top-rated one.")]
    if report["comparisons"]:
        md += ["", "Comparisons (each KL-regularised regime, online RL or offline preference, vs each selection "
               "regime; difference of Δ(H/log|A|), positive = the KL-regularised regime keeps more entropy):", "",
               _row(["KL-regularised", "selection", "difference [interval]", "across", "budget matched", "budgets"]),
               _row(["---"] * 6)]
        for cmp_ in report["comparisons"]:
            md.append(_row([cmp_["regime"], cmp_["selection"], _fmt(cmp_["difference"], "+.3f"), cmp_["across"],
                            "yes" if cmp_["budget_matched"] else "**NO**", cmp_["budget_message"]]))
    md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report.get("plots", [])] + [""]
    return "\n".join(md)


def frontier_markdown(report: dict) -> list[str]:
    fr = report.get("frontier") or {}
    md = ["", "## Matched distance: entropy and gold reward against KL along training", ""]
    if not fr.get("curves"):
        return md + ["No regime has along-training evaluations (`curve.points`): nothing to compare at matched distance."]
    md += [f"Every regime evaluated along its training (`curve.points`) by the exact evaluator on the curve suite's "
           f"prompts (`world.curve_suite`: the seed prompts by default). "
           f"d = Δ(H/log|A|) is interpolated (in √KL for KL) at {fr['grid_points']} matched values of x (KL to the base, "
           f"or the gold gain) in [x_min, x_max], where EVERY seed of both regimes has measured points on both sides "
           f"(never a chord from the base's (0, 0)); D = mean over that grid of "
           f"d(KL-regularised) − d(FeedME), per seed, interval across seeds. Calls: 'more/less entropy' when the "
           f"interval excludes 0 with |mean| ≥ {fr['margin']:g}, 'no difference' when it lies within "
           f"±{fr['margin']:g} (equivalence), else 'undecided'. Entropy lost = KL + Σ(π − π0)·log π0 exactly: "
           f"the cross term column says how much of a regime's entropy change is NOT distance.", "",
           _row(["KL-regularised", "FeedME", "matched on", "x range", "seeds", "D [interval]", "call"]),
           _row(["---"] * 7)]
    for c in fr["comparisons"]:
        md.append(_row([c["regime"], c["feedme"], c["x"], "-" if c["x_max"] is None else
                        f"[{c.get('x_min') or 0:.3f}, {c['x_max']:.3f}]",
                        str(len(c["seeds"])), _fmt(c["difference"], "+.4f"), c["call"]]))
    crossed_rows = [c for c in fr["comparisons"] if c.get("crossed")]
    if crossed_rows:
        md += ["", "With the seed prompts as a random effect too (each prompt matched at its own KL; D's interval "
               "from the seeds × prompts table, matched.crossed_interval)" + (": THE CALL ABOVE USES IT" if
                                                                             fr.get("random_prompts") else "") + ":", "",
               _row(["KL-regularised", "FeedME", "prompts", "D [interval, seeds and prompts random]"]), _row(["---"] * 4)]
        for c in crossed_rows:
            x = c["crossed"]
            md.append(_row([c["regime"], c["feedme"], f"{len(x['prompts'])}" + (f" ({len(x['dropped'])} without a "
                            "common range)" if x["dropped"] else ""), _fmt(x["difference"], "+.4f")]))
    md += ["", power_statement(fr)]
    md += ["", "End of each curve (mean over seeds; cross term Σ(π − π0)·log π0, nats):", "",
           _row(["regime", "points per seed", "KL (nats)", "Δ(H/log|A|)", "cross term", "gold gain", "ratings"]),
           _row(["---"] * 7)]
    for name, per_seed in fr["curves"].items():
        last = [rows[-1] for rows in per_seed.values()]
        mean = lambda k: _cell(_mean([x.get(k) for x in last]), ".3f")  # noqa: E731
        md.append(_row([name, str(min(map(len, per_seed.values()))), mean("frontier/kl"),
                        mean("frontier/delta_norm_entropy"), mean("frontier/cross_term"), mean("frontier/gold_gain"),
                        _cell(_mean([x.get("budget/samples_scored") for x in last]), ".0f")]))
    refs = fr.get("references") or {}
    if refs.get("best_of_k"):
        md += ["", "Reference curves of the base (exact): best-of-k (noiseless score) and π*_β ∝ π0·e^{R/β}:", "",
               _row(["policy", "KL (nats)", "Δ(H/log|A|)", "cross term", "gold gain"]), _row(["---"] * 5)]
        for label, key in (("best-of-{}", "k"), ("π*, β = {}", "beta")):
            for x in refs["best_of_k" if key == "k" else "optimum_beta"]:
                md.append(_row([label.format(f"{x[key]:g}"), f"{x['frontier/kl']:.3f}",
                                f"{x['frontier/delta_norm_entropy']:+.3f}", f"{x['frontier/cross_term']:+.4f}",
                                f"{x['frontier/gold_gain']:+.3f}"]))
    return md


def power_statement(fr: dict) -> str:
    """How well the matched comparisons can call: each KL comparison's 95% half-width against the margin."""
    m, parts = fr["margin"], []
    for c in fr["comparisons"]:
        d = c["difference"]
        if c["x"] != "kl" or d.get("lo") is None:
            continue
        half = (d["hi"] - d["lo"]) / 2
        parts.append(f"{c['regime']} vs {c['feedme']}: half-width {half:.4f} over {len(c['seeds'])} seeds"
                     + (" (narrower than the margin)" if half < m else " (NOT narrower than the margin: 'no difference' "
                        "cannot be called, whatever the truth; preset=powered has the seeds, bases and prompts for it)"))
    return (f"Power: a call needs the interval's half-width well below the margin ±{m:g}. " + "; ".join(parts) + "."
            if parts else f"Power: no matched-KL comparison has an interval (one seed, or no common KL range), so no "
                          f"call at the margin ±{m:g}.")


def closed_forms_markdown(report: dict) -> list[str]:
    cf = report.get("closed_forms") or {}
    if not cf:
        return []
    md = ["", "## What the closed forms predict", "",
          "From the base's exact answer distributions on the curve suite's prompts and the gold rater's expected scores "
          "(noise, clipping and rounding included): best-of-k (noiseless ranking, ties ∝ π0, real k), FeedME's "
          "expected selection (top-1 of k on NOISY integer ratings, ties uniform; then iterated rounds), π*_β ∝ "
          "π0·e^{R/β} and π*_{β,α} (collapse_lab/evaluation/reference_curves.py, docs/world.md). If two families trace one "
          f"curve, 'no difference at matched KL' is decided by the world, not measured. Tested KL range: up to "
          f"{cf['kl_tested']:.2f} nats.", "",
          _row(["families", "largest |Δd| at matched KL", "at KL"]), _row(["---"] * 3)]
    for s in cf["separations"]:
        md.append(_row([f"{s['a']} vs {s['b']}", _cell(s["value"], ".4f"), _cell(s["at_kl"], ".3f")]))
    md += ["", "Reference points (KL nats, d = Δ(H/log|A|), gold gain):", "",
           _row(["family", "parameter", "KL", "d", "gold gain"]), _row(["---"] * 5)]
    for name, pts in cf["families"].items():
        for x in pts:
            par = (f"k={x['k']:.3g}" + (f", rounds={x['rounds']}" if x.get("rounds", 1) > 1 else "") if "k" in x
                   else f"β={x['beta']:.3g}" + (f", α={x['alpha']:g}" if x.get("alpha") else ""))
            md.append(_row([name, par, f"{x['kl']:.3f}", f"{x['d']:+.4f}", f"{x['gold_gain']:+.3f}"]))
    md += ["", "Predicted beside measured, per pair (predicted D: the two regimes' reference families on the measured "
           "pair's own grid; artefact: D with every measured point moved onto the π*_β curve, whose true value is 0, "
           "so |artefact| ≤ 0.002 says the matched comparison itself adds no bias):", "",
           _row(["KL-regularised", "FeedME", "x", "predicted D", "predicted call", "measured call", "artefact D",
                 "reading"]), _row(["---"] * 8)]
    for p in cf["predictions"]:
        md.append(_row([p["regime"], p["feedme"], p["x"], _cell(p["predicted_difference"], "+.4f"), p["predicted_call"],
                        p["measured_call"], _cell(p.get("artefact_difference"), "+.5f"), p["reading"]]))
    md += ["", f"Does each regime track its own closed form? (mean TV of its end point to it over prompts and seeds; "
           f"tracks: TV ≤ {cf['tracking_tv']:g}; reward=rm regimes against the REWARD MODEL's exact π*, and the gold "
           "rater's beside it)", "",
           _row(["regime", "closed form", "TV (gold rater's)", "TV (reward model's π*)", "tracks"]), _row(["---"] * 5)]
    for n, t in cf["tracking"].items():
        s = t["closed_form"]
        form = {"optimum": lambda: f"π*_β={s['beta']:g}" + (f",α={s['alpha']:g}" if s["alpha"] else "")
                + f" ({s['reward']})", "feedme": lambda: f"FeedME k={s['k']}, {s['rounds']} round(s)",
                "best_of_k": lambda: f"best-of-{s['k']}", "base": lambda: "the base"}[s["kind"]]()
        md.append(_row([n, form, _cell(t["tv"], ".3f"), _cell(t["tv_rm"], ".3f"),
                        "-" if t["tracks"] is None else "yes" if t["tracks"] else "**no**"]))
    return md


# ---------------------------------------------------------------------------------- plots


def make_plots(ablation: Path, base: dict, by_regime: dict, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ablation / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # 1. the post's figure per regime: seed-averaged p(a) per seed prompt, base hatched
    for name, runs in [("base", [base])] + list(by_regime.items()):
        records = []
        for pid, a in runs[0]["answers"].items():
            probs = np.mean([r["answers"][pid]["probs"] for r in runs], axis=0)
            records.append({"id": pid, "answers": a["answers"], "answer_probs": probs.tolist(),
                            "answer_entropy": float(np.mean([r["per_prompt"][pid]["answer_entropy"] for r in runs])),
                            "max_entropy": a["max_entropy"], "valid_mass": float(probs.sum()),
                            "entropy_upper_bound": metrics.entropy_upper_bound(probs, _vocab(ablation)),
                            **({"reference_answer_probs": base["answers"][pid]["probs"]} if name != "base" else {})})
        path = out / f"post_{name}.png"
        plot_suite(records, f"{name}: p(answer) on the seed prompts (mean over {len(runs)} seed(s)); base hatched", path)
        written.append(path)
    names = list(report["regimes"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    # 2. entropy per regime with intervals
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, n in enumerate(names):
        s = report["regimes"][n]["metrics"]["norm_entropy"]
        err = None if s["lo"] is None else [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]
        ax.errorbar([i], [s["mean"]], yerr=err, fmt="o", color=colors[n], capsize=4)
        ax.scatter([i] * len(s["values"]), s["values"], s=8, color=colors[n], alpha=0.5)
    b = base["norm_entropy"]
    thr = report["config"]["ablate"]["collapse"]["threshold"]
    ax.axhline(b, color="k", lw=1, label=f"base {b:.3f}")
    ax.axhline(b - thr, color="r", lw=1, ls="--", label=f"collapse threshold (base - {thr:g})")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("H / log|A| (mean of 5 prompts)")
    ax.set_title("answer entropy per regime (dots: seeds; bars: 95% interval)", fontsize=9)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "entropy.png"))
    # 3. |ΔH| against KL, with the Pinsker + Fannes–Audenaert bound (d = 101)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    kls = [k for runs in by_regime.values() for r in runs for k, _ in r["points"] if k > 0]
    grid = np.logspace(math.log10(max(min(kls, default=1e-4), 1e-6) / 2), math.log10(max(max(kls, default=1.0), 1.0) * 2), 200)
    ax.plot(grid, [metrics.fannes_entropy_bound(metrics.pinsker_tv_bound(k), 101) for k in grid], "k-", lw=1,
            label="Fannes–Audenaert(Pinsker(KL)), d = 101")
    for n, runs in by_regime.items():
        pts = np.array([p for r in runs for p in r["points"]])
        if len(pts):
            ax.scatter(np.maximum(pts[:, 0], 1e-6), pts[:, 1], s=10, color=colors[n], label=n)
    ax.set_xscale("log")
    ax.set_xlabel("KL(p ‖ p_base) on the answers (nats)")
    ax.set_ylabel("|ΔH| (nats)")
    ax.set_title("entropy change vs KL to base (a point per prompt and seed)", fontsize=9)
    ax.legend(fontsize=6)
    written.append(_save(fig, out / "kl_entropy.png"))
    # 4. gold reward against KL: the over-optimisation frontier
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if base.get("gold_reward") is not None:
        ax.scatter([0], [base["gold_reward"]], color="k", marker="s", label="base")
    for n in names:
        m = report["regimes"][n]["metrics"]
        if m["gold_reward"]["mean"] is None:
            continue
        xerr = None if m["kl_to_reference"]["lo"] is None else [[m["kl_to_reference"]["mean"] - m["kl_to_reference"]["lo"]], [m["kl_to_reference"]["hi"] - m["kl_to_reference"]["mean"]]]
        yerr = None if m["gold_reward"]["lo"] is None else [[m["gold_reward"]["mean"] - m["gold_reward"]["lo"]], [m["gold_reward"]["hi"] - m["gold_reward"]["mean"]]]
        ax.errorbar([m["kl_to_reference"]["mean"]], [m["gold_reward"]["mean"]], xerr=xerr, yerr=yerr, fmt="o",
                    color=colors[n], capsize=3, label=n)
    ax.set_xlabel("KL to base on the answers (nats)")
    ax.set_ylabel("mean gold reward (noiseless, 1-7)")
    ax.set_title("reward vs KL (over-optimisation frontier)", fontsize=9)
    ax.legend(fontsize=6)
    written.append(_save(fig, out / "reward_kl.png"))
    # 5. the frontier: d and gold gain against KL along training, with the base's exact reference curves
    fr = report.get("frontier") or {}
    if fr.get("curves"):
        written.append(frontier_plot(fr, colors, out / "frontier.png", plt))
    # 6. training curves
    curves = {}
    for n in names:
        for seed in report["regimes"][n]["seeds"]:
            rows = _jsonl(ablation / "runs" / n / f"s{seed}" / "metrics.jsonl")
            for key in TRAINING_CURVES:
                pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
                if pts:
                    curves.setdefault(key, []).append((n, seed, pts))
    if curves:
        keys = list(curves)
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, key in zip(axes.flat, keys):
            seen = set()
            for n, seed, pts in curves[key]:
                x, y = zip(*pts)
                ax.plot(x, y, color=colors[n], lw=1, alpha=0.8, label=None if n in seen else n)
                seen.add(n)
            ax.set_title(key, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5)
        written.append(_save(fig, out / "training.png"))
    return written


def frontier_plot(fr: dict, colors: dict, path: Path, plt) -> Path:
    """Two panels against KL to the base: Δ(H/log|A|) and the gold gain. Thin lines: one seed's curve along
    training; thick: the mean over seeds of the interpolated curves, with a band of ± one standard error; black
    squares: best-of-k (k labelled); dashed: π*_β."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    refs = fr.get("references") or {}
    for ax, y in zip(axes, ("frontier/delta_norm_entropy", "frontier/gold_gain")):
        for name, per_seed in fr["curves"].items():
            c = colors.get(name, "grey")
            for rows in per_seed.values():
                pts = sorted([(0.0, 0.0)] + [(r["frontier/kl"], r[y]) for r in rows])
                ax.plot(*zip(*pts), color=c, lw=0.6, alpha=0.5)
            x_max = min(max(r["frontier/kl"] for r in rows) for rows in per_seed.values())
            if x_max > 0:
                grid = np.linspace(0, x_max, 30)
                ys = np.array([frontier.interpolate(sorted([(0.0, 0.0)] + [(r["frontier/kl"], r[y]) for r in rows]), grid)
                               for rows in per_seed.values()])
                m = ys.mean(0)
                ax.plot(grid, m, color=c, lw=2, label=name)
                if len(ys) > 1:
                    se = ys.std(0, ddof=1) / math.sqrt(len(ys))
                    ax.fill_between(grid, m - se, m + se, color=c, alpha=0.2)
        if refs.get("optimum_beta"):
            pts = sorted((x["frontier/kl"], x[y]) for x in refs["optimum_beta"])
            ax.plot(*zip(*pts), "k--", lw=1, label="π*_β (exact)")
        for x in refs.get("best_of_k", []):
            ax.scatter([x["frontier/kl"]], [x[y]], color="k", marker="s", s=14)
            ax.annotate(f"k={x['k']}", (x["frontier/kl"], x[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("KL to base on the answers (nats)")
        ax.set_ylabel({"frontier/delta_norm_entropy": "Δ(H / log|A|) vs base", "frontier/gold_gain": "gold gain (mean rating)"}[y])
        ax.legend(fontsize=6)
    fig.suptitle("along training, at matched distance (thin: seeds; thick ± s.e.: mean; squares: best-of-k)", fontsize=9)
    return _save(fig, path)


# -------------------------------------------------------------------------------- helpers


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


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _fmt(s: dict, f: str = ".3f") -> str:
    if s is None or s.get("mean") is None:
        return "-"
    if s.get("lo") is None:
        return format(s["mean"], f)
    return f"{format(s['mean'], f)} [{format(s['lo'], f)}, {format(s['hi'], f)}]"


def _cell(x, f: str) -> str:
    return "-" if x is None else format(x, f)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


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
