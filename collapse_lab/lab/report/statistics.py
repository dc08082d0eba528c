"""The report's statistics: collapse calls, paired comparisons, gold gain, the matched-distance comparison
and the closed forms' predictions, from the records (intervals across seeds: metrics.interval)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from collapse_lab.core.names import OFFLINE, ONLINE, SELECTION, get_dotted
from collapse_lab.evaluation import matched as matched_lib, reference_curves as rc
from collapse_lab.evaluation.metrics import interval
from collapse_lab.lab.budget import compare as compare_budgets
from collapse_lab.lab.report.records import (BUDGET_KEYS, COLLAPSE_METRICS, CURVE_KEYS, DIVERSITY_METRICS, PER_PROMPT,
                                             TRAINED_METRICS, _json, _suite_answers, _top_answer, bounds_of, curve_rows)


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


def budgets_matched(a: dict, b: dict) -> tuple[bool, str]:
    """Do two runs spend the same RATING BUDGET? (collapse_lab.lab.budget's rule on their manifests.)"""
    matched, message = compare_budgets(a["manifest"], b["manifest"])
    return bool(matched), str(message)


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


def regime_curves(ablation: Path, name: str, seeds) -> dict:
    """{seed: the rows of its curve (curve_rows: the frontier's pooled and per-prompt points)} of one regime of an
    ablation, for the seeds that have a curve."""
    per_seed = {s: curve_rows(ablation / "runs" / name / f"s{s}") for s in seeds}
    return {s: [{k: v for k, v in row.items() if k in CURVE_KEYS or k.startswith(PER_PROMPT)} for row in rows]
            for s, rows in per_seed.items() if rows}


def matched_pair(curves_a: dict, curves_b: dict, x: str, grid_points: int, confidence: float, margin: float,
                 random_prompts: bool) -> dict:
    """D = d(A) − d(B) at matched x ("frontier/kl" or "frontier/gold_gain") on the seeds both have
    (frontier.matched: a grid only where every seed of both has points on both sides), its call
    (matched_lib.equivalence_call at ±margin) and, on KL, the crossed comparison (each prompt matched at its own KL,
    seeds and prompts random); with `random_prompts` the call is made on the crossed interval (the pooled one kept
    as pooled_difference)."""
    points = [{s: matched_lib.curve_points(rows, x) for s, rows in c.items()} for c in (curves_a, curves_b)]
    m = matched_lib.matched(*points, grid_points, confidence, sqrt_x=x == "frontier/kl")
    cross = matched_lib.crossed(curves_a, curves_b, grid_points, confidence) if x == "frontier/kl" else None
    row = {"x": x.split("/")[1], **(m or {"difference": interval([]), "x_min": None, "x_max": None, "seeds": [],
                                          "grid": []}),
           "crossed": cross, "call": "no common range" if m is None else
           matched_lib.equivalence_call(m["difference"], margin)}
    if cross and random_prompts:  # the call on the seeds x prompts interval
        row["pooled_difference"], row["difference"] = row["difference"], cross["difference"]
        row["call"] = matched_lib.equivalence_call(cross["difference"], margin)
    return row


def frontier_section(ablation: Path, by_regime: dict, regimes: dict, rule: dict, confidence: float) -> dict:
    """The comparison at MATCHED distance: every regime's curves (per seed), the base's exact reference curves
    (evals/base/reference_curves.json), and for each KL-regularised regime (β > 0 or adaptive) against each
    FeedME regime with curves, the paired difference of d = Δ(H/log|A|) at matched KL and at matched gold gain
    (matched_pair), with its call (`rule`: ablate.frontier)."""
    margin, grid_points = float(rule.get("margin", 0.02)), int(rule.get("grid_points", 8))
    curves = {}
    for name, runs in by_regime.items():
        per_seed = regime_curves(ablation, name, [x["seed"] for x in runs])
        if per_seed:
            curves[name] = per_seed
    kl = [n for n in curves if regimes[n]["group"] in (ONLINE, OFFLINE)
          and ((regimes[n]["kl_coef"] or 0) > 0 or regimes[n]["adaptive_kl"])]
    feedme = [n for n in curves if regimes[n]["group"] == SELECTION and not regimes[n].get("control_of")]
    comparisons = [{"regime": n, "group": regimes[n]["group"], "feedme": f,
                    **matched_pair(curves[n], curves[f], x, grid_points, confidence, margin,
                                   bool(rule.get("random_prompts")))}
                   for f in feedme for n in kl for x in ("frontier/kl", "frontier/gold_gain")]
    return {"margin": margin, "grid_points": grid_points, "curves": curves, "comparisons": comparisons,
            "primary": rule.get("primary"), "random_prompts": bool(rule.get("random_prompts")),
            "references": _json(ablation / "evals" / "base" / "reference_curves.json", missing=True) or {}}


def crossed_artefact(forms, curves: dict, c: dict, grid_points: int) -> Optional[dict]:
    """The interpolation artefact of the CROSSED (per-prompt) D, the one a random-prompts call rests on: on each of
    its prompts every measured (KL, d) point of both regimes is moved onto THAT prompt's own π*_β curve (traced to
    the largest KL measured on it) and matched as the call matches them; the true D is 0 on every prompt.
    {mean (over the prompts: the crossed D's own average), largest (|.|), prompts, left_out (prompts whose measured
    KL lies beyond what π*_β reaches on them)}; None without a crossed comparison."""
    seeds = {str(s) for s in c["crossed"]["seeds"]}
    by_id = {f.id: f for f in forms}
    values, left_out = [], []
    for pid in c["crossed"]["prompts"]:
        pts = [{s: matched_lib.curve_points(rows, f"frontier/kl/{pid}", f"frontier/delta_norm_entropy/{pid}")
                for s, rows in curves.get(r, {}).items() if str(s) in seeds} for r in (c["regime"], c["feedme"])]
        top = max((x for p in pts for cur in p.values() for x, _ in cur), default=0.0)
        curve = rc.optimum_curve([by_id[pid]], kl_max=top) if pid in by_id else []
        if not curve or max(x["kl"] for x in curve) < top:
            left_out.append(pid)
            continue
        d = matched_lib.artefact_difference(*pts, lambda x, cur=curve: float(rc.d_at(cur, [x])[0]), grid_points)
        if d is not None:
            values.append(d)
    if not values:
        return None
    return {"mean": float(np.mean(values)), "largest": float(np.max(np.abs(values))), "prompts": len(values),
            "left_out": left_out}


def _off_phrase(off: Optional[dict]) -> str:
    """'; at matched KL off its own closed-form curve: A −0.028 [..], B +0.004 [..]' (nothing without it)."""
    if not off or any(v is None or v.get("lo") is None for v in off.values()):
        return ""
    return "; at matched KL, off its own closed-form curve: " + ", ".join(
        f"{r} {v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]" for r, v in off.items())


def gradient_path_prediction(c: dict, fam_a: list, fam_b: list, paths: dict, margin: float) -> Optional[dict]:
    """The pair predicted again with each KL-regularised regime on its exact softmax policy-gradient PATH instead of
    its π*_β family (rc.gradient_path): {off: {regime: mean over the pair's grid of d_path − d_family}, predicted_
    difference, predicted_call}. The family is the natural-gradient path (off 0), so a measured offset between 0
    and the vanilla path's says how far the optimiser's geometry moved it; None where no regime has a path or a
    path does not reach the grid."""
    grid = c.get("grid")
    regimes = (c["regime"], c["feedme"])
    if not grid or not any(r in paths for r in regimes):
        return None
    on = [paths.get(r, f) for r, f in zip(regimes, (fam_a, fam_b))]
    off = {r: float(np.mean(rc.d_at(paths[r], grid) - rc.d_at(f, grid))) for r, f in zip(regimes, (fam_a, fam_b))
           if r in paths}
    pred = rc.predicted_difference(*on, grid)
    if pred is None or any(np.isnan(v) for v in off.values()):
        return None
    return {"off": off, "predicted_difference": pred, "predicted_call": rc.predicted_call(pred, margin)}


def _path_phrase(path: Optional[dict]) -> str:
    """'; an exact softmax policy-gradient path on the same objective lies off its family by kl0.1 −0.0522 (the
    natural-gradient path: 0), which predicts D −0.0571 (less entropy)' (nothing without a path)."""
    if not path:
        return ""
    offs = ", ".join(f"{r} {v:+.4f}" for r, v in path["off"].items())
    return (f"; an exact softmax policy-gradient path on the same objective lies off its family by {offs} (the natural-"
            f"gradient path: 0), which predicts D {path['predicted_difference']:+.4f} ({path['predicted_call']})")


def early_updates_of(runs: list[dict], seeds: set[str]) -> Optional[dict]:
    """A regime's first PPO updates on the pair's seeds (records.early_updates per run): {clipfrac, approxkl} as
    intervals across seeds, and steps; None where its runs logged none (not the lab's PPO)."""
    early = [x["early"] for x in runs if str(x["seed"]) in seeds and (x.get("early") or {}).get("clipfrac") is not None]
    if not early:
        return None
    return {"clipfrac": interval([e["clipfrac"] for e in early], bounds=(0.0, 1.0)),
            "approxkl": interval([e["approxkl"] for e in early if e.get("approxkl") is not None], bounds=(0.0, math.inf)),
            "steps": min(e["steps"] for e in early)}


def _early_phrase(regime: str, early: Optional[dict]) -> str:
    """'; kl0.1's first 10 updates clipped 0.089 [..] of sampled tokens (approxkl 0.0142)' (nothing without them):
    where PPO's path runs off its family goes with how large its early steps are that meet the clip (docs/ppo.md)."""
    if not early or early["clipfrac"].get("mean") is None:
        return ""
    c, k = early["clipfrac"], early["approxkl"]
    band = "" if c.get("lo") is None else f" [{c['lo']:.3f}, {c['hi']:.3f}]"
    step = "" if k.get("mean") is None else f" (approxkl {k['mean']:.4f})"
    return f"; {regime}'s first {early['steps']} updates clipped {c['mean']:.3f}{band} of sampled tokens{step}"


def closed_forms_section(ablation: Path, by_regime: dict, regimes: dict, fr: dict) -> dict:
    """What the closed forms predict (collapse_lab/evaluation/reference_curves.py, numpy only): the base's reference families
    (best-of-k, FeedME's expected selection, π*_β, π*_{β,α}), their largest separation at matched KL within the
    tested range, per frontier comparison the predicted D and call beside the measured one and the interpolation
    artefact (every measured point moved onto the π*_β curve: |D| must be ≤ 0.002) and each regime's offset from
    its own family at matched KL (off_curve: pooled D = predicted + off A − off B), and per regime the TV of its
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
    reach = max([rc.KL_MAX, *measured])  # traced as far as any measured point, so every grid has a prediction
    fams = rc.reference_families(forms, ks[0], alphas, kl_max=reach)
    for k in ks[1:]:
        fams[f"feedme_k{k}"] = rc.feedme_curve(forms, k, kl_max=reach)
    pairs = [("best_of_k", "optimum_beta"), ("feedme", "optimum_beta"), ("feedme", "best_of_k")]
    separations = [{"a": a, "b": b, **rc.separation(fams[a], fams[b], tested)} for a, b in pairs]
    family_of = lambda n: None if specs.get(n) is None else (  # noqa: E731
        fams.get(f"feedme_k{specs[n]['k']}", fams["feedme"]) if specs[n]["kind"] == "feedme"
        else rc.reference_for(specs[n], fams))
    paths = {}  # each online RL regime's objective climbed by exact softmax policy gradient (rc.gradient_path); not
    for n, s in specs.items():  # DPO's, which fits pairs offline, not along a policy-gradient path
        if s and s["kind"] == "optimum" and regimes[n].get("group") == ONLINE:
            key = f"gradient_path_beta{s['beta']:g}" + (f"_alpha{s['alpha']:g}" if s["alpha"] else "")
            fams[key] = fams.get(key) or rc.gradient_path(forms, s["beta"], s["alpha"], kl_max=reach)
            paths[n] = fams[key]
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
            if a and b and c.get("grid"):  # D = predicted + off(A) − off(B), pooled over prompts, on the pair's seeds
                seeds = {str(s) for s in c.get("seeds", [])}
                row["off_curve"] = {r: matched_lib.off_curve({s: v for s, v in p.items() if str(s) in seeds},
                                                             lambda g, f=f: rc.d_at(f, g), c["grid"])
                                    for r, p, f in zip((c["regime"], c["feedme"]), pts, (a, b))}
                row["gradient_path"] = gradient_path_prediction(c, a, b, paths, fr["margin"])
                row["early_updates"] = early_updates_of(by_regime.get(c["regime"], []), seeds)
            if c.get("crossed"):
                row["artefact_crossed"] = crossed_artefact(forms, fr["curves"], c, fr["grid_points"])
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
                          "closed form is wrong") + ("" if agree else _off_phrase(row.get("off_curve"))
                                                     + _path_phrase(row.get("gradient_path"))
                                                     + _early_phrase(row["regime"], row.get("early_updates")))
    return {"kl_tested": tested, "separations": separations, "families": {k: rc.thin(v) for k, v in fams.items()},
            "predictions": predictions, "tracking": track, "tracking_tv": rc.TRACKING_TV}


def summarise_regimes(by_regime: dict[str, list[dict]], control: dict[str, str], threshold: float,
                      confidence: float) -> dict[str, dict]:
    """Per regime: every metric's mean and interval across seeds, its collapse call (vs the base and its
    control), its budget and what the ablation stored of its declaration (group, KL and entropy coefficients)."""
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
        regimes[name] = {
            "group": runs[0]["group"], "recipe": runs[0]["recipe"], "seeds": [x["seed"] for x in runs],
            "kl_coef": runs[0].get("kl_coef"), "adaptive_kl": runs[0].get("adaptive_kl"),
            "ent_coef": runs[0].get("ent_coef"),  # as the ablation stored them from each regime's declaration
            "metrics": metrics_, "answer_entropy_per_prompt": per_prompt, "top_answer": top, "top_prob": top_p,
            "control": control.get(name), "control_of": control_of, **call,
            "collapsed": None if control_of else call["collapsed"], "call": None if control_of else call["call"],
            "budget": budget,
            "status": sorted({str(x["budget"]["status"]) for x in runs}),
        }
    return regimes
