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

The package is pure: it reads stored results only and imports none of torch, trl or accelerate (tested):
records (what is read), statistics, verdict, markdown, plots; `build` ties them together.
"""

from __future__ import annotations

import json
from pathlib import Path

from collapse_lab.core.names import get_dotted
from collapse_lab.evaluation.metrics import interval
from collapse_lab.lab.report.markdown import HELDOUT_TEXT, TEMPLATES_TEXT, closed_forms_markdown, markdown
from collapse_lab.lab.report.plots import make_plots
from collapse_lab.lab.report.records import (COLLAPSE_METRICS, DIVERSITY_METRICS, TRAINED_METRICS, _json, _jsonable,
                                             _top_answer, collect, run_record, templates_trained_on)
from collapse_lab.lab.report.statistics import (closed_forms_section, collapse_test, compare, frontier_section,
                                                gold_gain, no_gold_gain, regime_collapse, summarise_regimes)
from collapse_lab.lab.report.verdict import matched_answer, verdict

__all__ = ["build", "HELDOUT_TEXT", "TEMPLATES_TEXT", "closed_forms_markdown", "closed_forms_section", "collapse_test",
           "compare", "frontier_section", "interval", "markdown", "matched_answer", "no_gold_gain", "regime_collapse",
           "run_record", "verdict", "_top_answer"]  # the package's face: what callers and tests use



def build(ablation: Path, write: bool = True) -> dict:
    """report.json / report.md / plots from the ablation directory alone; returns the report."""
    ablation = Path(ablation)
    config, base, by_regime, control = collect(ablation)
    acfg = config["ablate"]
    threshold, confidence = float(acfg["collapse"]["threshold"]), float(acfg["collapse"]["confidence"])
    regimes = summarise_regimes(by_regime, control, threshold, confidence)
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
