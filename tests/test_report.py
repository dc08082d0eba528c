"""The report's statistics, collapse rule and verdict on small synthetic inputs (pure functions)."""

import json

import numpy as np
import pytest
from scipy import stats

from collapse_lab.lab import report


def test_interval_is_the_t_interval_across_values():
    x = [0.1, 0.3, 0.2, 0.6]
    ci = report.interval(x, 0.95)
    half = stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert ci["mean"] == pytest.approx(0.3) and ci["n"] == 4
    assert ci["lo"] == pytest.approx(0.3 - half) and ci["hi"] == pytest.approx(0.3 + half)
    one = report.interval([0.5])
    assert one["mean"] == 0.5 and one["lo"] is None and one["hi"] is None
    assert report.interval([None, float("nan")])["mean"] is None


def test_collapse_rule_needs_both_the_threshold_and_an_interval_below_zero():
    # a large, consistent drop: collapsed
    assert report.collapse_test([-0.3, -0.32, -0.28], [], 0.05, 0.95)["collapsed"]
    # a large mean drop whose interval crosses 0 (one seed barely moves): not collapsed
    assert not report.collapse_test([-0.6, 0.05], [], 0.05, 0.95)["collapsed"]
    # a consistent but small drop (within the threshold): not collapsed
    assert not report.collapse_test([-0.02, -0.021, -0.019], [], 0.05, 0.95)["collapsed"]
    # one seed: the interval is across the prompts, and says so
    t = report.collapse_test([-0.2], [-0.2, -0.25, -0.15, -0.22, -0.18], 0.05, 0.95)
    assert t["collapsed"] and t["across"] == "prompts" and t["n"] == 5


def _regime(family, d, kl_coef=None, collapsed=None, top=" 97", p=0.3):
    test = report.collapse_test(d, [], 0.05, 0.95)
    return {"group": {"feedme": "selection", "ppo": "online RL"}[family], "kl_coef": kl_coef, "adaptive_kl": False, "collapsed": test["collapsed"] if collapsed is None else collapsed,
            "top_answer": top, "top_prob": p,
            "metrics": {"norm_entropy": report.interval([0.99 + x for x in d])}}


def _report(regimes, comparisons):
    return {"regimes": regimes, "comparisons": comparisons, "base": {"metrics": {"norm_entropy": 0.99}},
            "config": {"ablate": {"collapse": {"threshold": 0.05}}}, "preference_strength": 1.0}


def _runs(d_by_seed, samples):
    return [{"seed": s, "delta_norm_entropy": d, "delta_prompts": [d] * 5,
             "budget": {"samples_scored": samples, "manifest": {"samples_scored": samples}}}
            for s, d in enumerate(d_by_seed)]


def test_verdict_yes_when_feedme_collapses_and_kl_ppo_keeps_entropy_at_a_matched_budget():
    by = {"sft": _runs([-0.4, -0.35, -0.45], 1024), "kl0.1": _runs([-0.01, 0.0, -0.02], 1024)}
    regimes = {"sft": _regime("feedme", [-0.4, -0.35, -0.45]), "kl0.1": _regime("ppo", [-0.01, 0.0, -0.02], 0.1)}
    comps = report.compare(by, regimes, 0.95)
    (c,) = comps
    assert c["collapses_less"] and c["budget_matched"] and c["across"] == "seeds"
    v = report.verdict(_report(regimes, comps))
    assert v["collapsed"] == ["sft"] and v["endpoint_answer"].startswith("YES")
    assert "sft: H/log|A|" in v["text"]


def test_verdict_no_when_kl_ppo_collapses_more():
    by = {"sft": _runs([-0.01, -0.02, 0.0], 1024), "kl0.1": _runs([-0.4, -0.35, -0.45], 1024)}
    regimes = {"sft": _regime("feedme", [-0.01, -0.02, 0.0]), "kl0.1": _regime("ppo", [-0.4, -0.35, -0.45], 0.1)}
    v = report.verdict(_report(regimes, report.compare(by, regimes, 0.95)))
    assert v["endpoint_answer"].startswith("NO") and v["collapsed"] == ["kl0.1"]


def test_unmatched_budgets_are_flagged_and_do_not_decide_the_verdict():
    by = {"sft": _runs([-0.4, -0.35, -0.45], 1024), "kl0.1": _runs([0.0, 0.0, -0.01], 12800)}
    regimes = {"sft": _regime("feedme", [-0.4, -0.35, -0.45]), "kl0.1": _regime("ppo", [0.0, 0.0, -0.01], 0.1)}
    comps = report.compare(by, regimes, 0.95)
    assert not comps[0]["budget_matched"] and "1024" in comps[0]["budget_message"]
    v = report.verdict(_report(regimes, comps))
    assert "BUDGETS NOT MATCHED" in v["text"] and v["endpoint_answer"].startswith("UNDECIDED")


def test_kl0_is_not_a_kl_penalised_regime():
    by = {"sft": _runs([-0.4, -0.35], 1), "kl0": _runs([0.0, 0.01], 1)}
    regimes = {"sft": _regime("feedme", [-0.4, -0.35]), "kl0": _regime("ppo", [0.0, 0.01], 0.0)}
    assert report.compare(by, regimes, 0.95) == []
    assert report.verdict(_report(regimes, []))["endpoint_answer"].startswith("not tested")


def test_top_answer_is_the_argmax_of_the_mean_over_prompts_and_seeds():
    a = {"p1": {"answers": [" 1", " 2"], "probs": [0.6, 0.4]}, "p2": {"answers": [" 1", " 2", " 3"], "probs": [0.1, 0.1, 0.8]}}
    top, p = report._top_answer([a])
    assert top == " 3" and p == pytest.approx(0.4)


def _d(d, prompts, seed=0):
    return {"seed": seed, "delta_norm_entropy": d, "delta_prompts": prompts}


def test_feedme_below_base_but_not_below_its_finite_sample_control_is_not_collapsed():
    # one seed (the quick preset): both intervals across the five prompts, paired by prompt for the control
    sft = [_d(-0.08, [-0.07, -0.09, -0.08, -0.075, -0.085])]
    control = [_d(-0.076, [-0.075, -0.08, -0.07, -0.08, -0.075])]  # SFT on as many random base samples
    call = report.regime_collapse(sft, control, 0.05, 0.95)
    assert call["collapse_test"]["collapsed"]  # the old rule alone would call it collapsed
    vs = call["collapse_test_control"]
    assert vs["across"] == "prompts" and vs["mean"] == pytest.approx(-0.004) and not vs["collapsed"]
    assert not call["collapsed"]
    # without the control the rule is the old one
    alone = report.regime_collapse(sft, None, 0.05, 0.95)
    assert alone["collapsed"] and alone["collapse_test_control"] is None


def test_feedme_below_base_and_below_its_control_is_collapsed_paired_by_seed():
    sft = [_d(-0.40, [-0.4] * 5, 0), _d(-0.35, [-0.35] * 5, 1), _d(-0.45, [-0.45] * 5, 2)]
    control = [_d(-0.08, [-0.08] * 5, 0), _d(-0.06, [-0.06] * 5, 1), _d(-0.09, [-0.09] * 5, 2)]
    call = report.regime_collapse(sft, control, 0.05, 0.95)
    vs = call["collapse_test_control"]
    assert vs["across"] == "seeds" and vs["values"] == pytest.approx([-0.32, -0.29, -0.36]) and vs["collapsed"]
    assert call["collapse_test"]["collapsed"] and call["collapsed"]
    # far below the control but NOT below the base by the threshold (the control gained entropy): not collapsed
    up = [_d(0.3, [0.3] * 5, s) for s in range(3)]
    small = [_d(-0.03, [-0.03] * 5, 0), _d(-0.02, [-0.02] * 5, 1), _d(-0.04, [-0.04] * 5, 2)]
    call = report.regime_collapse(small, up, 0.05, 0.95)
    assert call["collapse_test_control"]["collapsed"] and not call["collapsed"]


def test_the_control_is_shown_not_judged_and_named_in_the_verdict():
    by = {"sft": _runs([-0.08, -0.07, -0.09], 1024), "sft-random": _runs([-0.08, -0.07, -0.085], 1024),
          "kl0.1": _runs([-0.01, 0.0, -0.02], 1024)}
    call = report.regime_collapse(by["sft"], by["sft-random"], 0.05, 0.95)
    regimes = {"sft": {**_regime("feedme", [-0.08, -0.07, -0.09], collapsed=call["collapsed"]), **call,
                       "control": "sft-random"},
               "sft-random": {**_regime("feedme", [-0.08, -0.07, -0.085], collapsed=None), "control_of": "sft"},
               "kl0.1": _regime("ppo", [-0.01, 0.0, -0.02], 0.1)}
    comps = report.compare(by, regimes, 0.95)
    assert [(c["regime"], c["selection"]) for c in comps] == [("kl0.1", "sft")]  # the control is no FeedME to compare
    v = report.verdict(_report(regimes, comps))
    assert v["collapsed"] == [] and "sft-random" not in v["not_collapsed"] and "sft" in v["not_collapsed"]
    assert "vs its control sft-random" in v["text"] and "not both" in v["text"]


def test_a_large_drop_that_the_seeds_disagree_on_is_inconclusive_not_cleared():
    """Mean d far below -threshold but the interval reaches 0 (one seed barely moved): neither
    collapsed nor 'not collapsed', and the verdict does not answer NOT APPLICABLE."""
    d_ppo, d_sft = [-0.9, -0.05, -0.1], [-0.02, -0.03, -0.025]
    call = report.regime_collapse([_d(d, [d] * 5, s) for s, d in enumerate(d_ppo)], None, 0.05, 0.95)
    assert not call["collapsed"] and call["call"] == "inconclusive"
    cleared = report.regime_collapse([_d(d, [d] * 5, s) for s, d in enumerate(d_sft)], None, 0.05, 0.95)
    assert cleared["call"] == "not collapsed"
    by = {"sft": _runs(d_sft, 1024), "kl0.1": _runs(d_ppo, 1024)}
    regimes = {"sft": {**_regime("feedme", d_sft), "call": cleared["call"]},
               "kl0.1": {**_regime("ppo", d_ppo, 0.1), "call": call["call"]}}
    v = report.verdict(_report(regimes, report.compare(by, regimes, 0.95)))
    assert v["inconclusive"] == ["kl0.1"] and v["collapsed"] == [] and v["not_collapsed"] == ["sft"]
    assert "Inconclusive" in v["text"] and not v["endpoint_answer"].startswith("NOT APPLICABLE")


def test_a_drop_without_gold_gain_is_flagged_as_not_preference_driven():
    gain = lambda values: {**report.interval(values), "across": "seeds"}  # noqa: E731
    dropped = {"group": "online RL", "call": "collapsed"}
    assert report.no_gold_gain({**dropped, "gold_gain": gain([0.0, -0.02, 0.01])}, 0.02)
    assert report.no_gold_gain({**dropped, "gold_gain": gain([0.012, 0.011, 0.013])}, 0.02)  # significant but tiny
    assert not report.no_gold_gain({**dropped, "gold_gain": gain([0.3, 0.35, 0.32])}, 0.02)  # the raters rewarded it
    assert not report.no_gold_gain({**dropped, "call": "not collapsed", "gold_gain": gain([0.0, 0.0, -0.1])}, 0.02)
    assert report.no_gold_gain({**dropped, "group": "selection", "gold_gain": gain([0.0, 0.01, -0.01])}, 0.02)
    assert not report.no_gold_gain({**dropped, "control_of": "sft", "gold_gain": gain([0.0, 0.01, -0.01])}, 0.02)
    one = {"mean": 0.01, "lo": None, "hi": None}
    assert report.no_gold_gain({**dropped, "call": "inconclusive", "gold_gain": one}, 0.02)
    assert not report.no_gold_gain({**dropped, "gold_gain": {**one, "mean": 0.4}}, 0.02)


def test_gold_gain_is_exact_from_the_curves_when_the_run_has_them():
    curves = {0: [{"frontier/gold_gain": 0.5}, {"frontier/gold_gain": 0.2}], 1: [{"frontier/gold_gain": 0.4}]}
    g = report.gold_gain([{"seed": 0}, {"seed": 1}], {}, 0.95, curves)
    assert g["source"] == "exact" and g["values"] == [0.2, 0.4]
    sampled = report.gold_gain([{"gold_reward": 6.0, "gold_prompts": [6.0, 6.0]}], {"gold_reward": 5.5,
                                                                                    "gold_prompts": [5.0, 6.0]}, 0.95)
    assert sampled["source"] == "sampled" and sampled["across"] == "prompts" and sampled["mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("calls, answer", [
    (["more entropy", "more entropy"], "YES"), (["no difference", "no difference"], "NO DIFFERENCE"),
    (["no difference", "less entropy"], "NO:"), (["more entropy", "undecided"], "UNDECIDED"),
    (["one seed: no call"], "NO CALL"), ([], "NOT TESTED")])
def test_the_first_question_is_answered_from_the_matched_kl_comparisons_of_online_rl(calls, answer):
    comps = [{"regime": f"kl{i}", "feedme": "sft", "group": "online RL", "x": "kl", "call": c} for i, c in enumerate(calls)]
    comps += [{"regime": "dpo0.1", "feedme": "sft", "group": "offline preference", "x": "kl", "call": "less entropy"},
              {"regime": "kl0", "feedme": "sft", "group": "online RL", "x": "gold_gain", "call": "less entropy"}]
    assert report.matched_answer({"frontier": {"comparisons": comps, "margin": 0.02}}).startswith(answer)


# ------------------------------------------------ trained-on prompts (templates suite), held-out intro


def _suite_json(path, entropies, max_entropy, changes=None):
    prompts = [{"id": f"p{i}", "answers": [" 1", " 2"], "answer_probs": [0.5, 0.5], "answer_entropy": h,
                "max_entropy": max_entropy, "top_answer": " 1", "top_prob": 0.5, "valid_mass": 0.9,
                **({"entropy_change": changes[i], "kl_to_reference": 0.1 * (i + 1), "tv_to_reference": 0.2}
                   if changes else {})} for i, h in enumerate(entropies)]
    path.write_text(json.dumps({"summary": {}, "prompts": prompts}))


def test_run_record_reads_the_trained_on_suite_when_it_was_evaluated(tmp_path):
    _suite_json(tmp_path / "seed.json", [4.0, 4.2], 4.6)
    old = report.run_record(tmp_path)  # an ablation from before the templates suite
    assert all(old[k] is None for k, _, _ in report.TRAINED_METRICS)
    _suite_json(tmp_path / "templates.json", [2.0, 3.0], 4.0, changes=[-0.4, -0.8])
    rec = report.run_record(tmp_path)
    assert rec["trained.norm_entropy"] == pytest.approx((0.5 + 0.75) / 2)
    assert rec["trained.delta_norm_entropy"] == pytest.approx((-0.1 - 0.2) / 2)
    assert rec["trained.kl_to_reference"] == pytest.approx(0.15) and rec["trained.valid_mass"] == pytest.approx(0.9)
    assert rec["norm_entropy"] == old["norm_entropy"]  # the seed suite's numbers are untouched


def _md_report(heldout, trained):
    m = {k: None for k, _, _ in report.COLLAPSE_METRICS + report.DIVERSITY_METRICS}
    m.update(norm_entropy=0.97, answer_entropy=4.4, **{k: (0.95 if trained else None) for k, _, _ in report.TRAINED_METRICS})
    return {"ablation": "checkpoints/ablations/x", "rule": "r", "verdict": {"text": "v"}, "regimes": {},
            "comparisons": [], "compute": {}, "heldout_eval_prompts": heldout,
            "config": {"ablate": {"preset": "quick", "seed": 0, "seeds": 1, "collapse": {"confidence": 0.95}}, "lab": []},
            "base": {"metrics": m, "answer_entropy_per_prompt": {}, "top_answer": " 37", "top_prob": 0.04}}


def test_markdown_says_whether_eval_prompts_were_held_out_and_shows_trained_on_prompts():
    md = report.markdown(_md_report(True, True))
    assert report.HELDOUT_TEXT[True] in md and "## Trained-on prompts (templates suite)" in md
    assert "| base | 0.950 |" in md
    md = report.markdown(_md_report(False, False))
    assert report.HELDOUT_TEXT[False] in md and "Trained-on prompts" not in md
    assert "HELD OUT" not in report.markdown(_md_report(None, False))  # a report from before the option
    held = {**_md_report(False, True), "templates_trained": False}  # tuned on the seed prompts only
    md = report.markdown(held)
    assert "## Held-out prompts (templates suite)" in md and "Trained-on prompts" not in md


def test_templates_count_as_trained_on_unless_every_fine_tuning_number_prompt_was_a_seed_prompt():
    world = lambda **w: {"world": {"seed_prompt_share": 0.5, **w}}  # noqa: E731
    assert report.templates_trained_on(world(heldout_eval_prompts=True, train_seed_share=1.0))
    assert not report.templates_trained_on(world(heldout_eval_prompts=False, train_seed_share=1.0))
    assert report.templates_trained_on(world(heldout_eval_prompts=False, train_seed_share=0.9))
    assert report.templates_trained_on(world(heldout_eval_prompts=False, train_seed_share=None))  # the corpus's 0.5
    assert not report.templates_trained_on(world(train_seed_share=None, seed_prompt_share=1.0))


def test_one_seed_gets_no_yes_or_no_at_the_end_points_either():
    """The five prompts of one seed are not replicates: the same separation that answers YES with three seeds
    answers NO CALL with one."""
    by = {"sft": _runs([-0.4], 1024), "kl0.1": _runs([-0.01], 1024)}
    for runs, d in ((by["sft"], [-0.4, -0.35, -0.45, -0.42, -0.38]), (by["kl0.1"], [-0.01, 0.0, -0.02, 0.01, -0.01])):
        runs[0]["delta_prompts"] = d
    regimes = {"sft": _regime("feedme", [-0.4], collapsed=True), "kl0.1": _regime("ppo", [-0.01], 0.1)}
    comps = report.compare(by, regimes, 0.95)
    assert comps[0]["across"] == "prompts" and comps[0]["collapses_less"]
    assert report.verdict(_report(regimes, comps))["endpoint_answer"].startswith("NO CALL")


def test_gold_reward_interval_holds_its_mean_above_seven():
    """The noiseless gold score of a favourite is 6 + the preference terms, above 7: the report's valid range
    for it must not clip its interval below its own mean (that crashed the reward-vs-KL plot)."""
    from collapse_lab.evaluation.metrics import interval
    from collapse_lab.lab.report.records import bounds_of
    low, high = bounds_of("gold_reward")
    assert low == 1.0 and high > 8.5  # 6 + preference_strength 1.5 + graded_strength 1 is reachable
    iv = interval([7.2, 7.4, 7.3], bounds=bounds_of("gold_reward"))
    assert iv["lo"] <= iv["mean"] <= iv["hi"]


def test_early_updates_read_ppo_rows_only_and_the_first_ones(tmp_path):
    """records.early_updates: the mean clip fraction and approxkl over PPO's first updates, skipping the along-training
    curve rows interleaved with them; nothing for a run that logged no PPO update (FeedME)."""
    import json

    from collapse_lab.lab.report import records

    rows = [{"frontier/kl": 0.0}] + [{"policy/clipfrac": 0.1 * (i + 1), "policy/approxkl": 0.01 * (i + 1)}
                                     for i in range(4)] + [{"frontier/kl": 0.3}, {"policy/clipfrac": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = records.early_updates(tmp_path, steps=3)
    assert got["steps"] == 3 and abs(got["clipfrac"] - 0.2) < 1e-12 and abs(got["approxkl"] - 0.02) < 1e-12
    assert abs(records.early_updates(tmp_path, steps=10)["clipfrac"] - 0.38) < 1e-12  # all five updates
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"train/loss": 1.0}) + "\n")
    assert records.early_updates(tmp_path) == {}


def test_top_answers_counts_each_seeds_top_answers_and_pairs_seeds(tmp_path):
    """benchmarks/top_answers.py: per seed the commonest top answers over the suite's prompts, and per regime the
    interval of H/log|A| on the seed prompts and its difference from another regime paired by seed."""
    import subprocess
    import sys
    from pathlib import Path

    from collapse_lab.evaluation.metrics import interval

    def suite(path, tops, h):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompts": [{"id": f"p{i}", "answers": [a], "answer_probs": [1.0], "valid_mass": 1.0,
                                                  "top_answer": a, "top_prob": 0.5, "answer_entropy": h * 2.0,
                                                  "max_entropy": 2.0} for i, a in enumerate(tops)]}))

    ev = tmp_path / "evals"
    suite(ev / "base" / "heldout.json", [" 7"] * 3, 0.9)
    suite(ev / "base" / "seed.json", [" 7"], 0.9)
    for seed, (h_a, h_b) in enumerate([(0.1, 0.3), (0.2, 0.5), (0.3, 0.4)]):
        suite(ev / "a" / f"s{seed}" / "heldout.json", [" 1", " 1", " 10"], 0.0)
        suite(ev / "a" / f"s{seed}" / "seed.json", [" 1"], h_a)
        suite(ev / "b" / f"s{seed}" / "heldout.json", [" 42"] * 3, 0.0)
        suite(ev / "b" / f"s{seed}" / "seed.json", [" 42"], h_b)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "top_answers.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "--against", "b"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "a s2: ' 1' on 2, ' 10' on 1" in r.stdout and "b s0: ' 42' on 3" in r.stdout
    diff = interval([0.1 - 0.3, 0.2 - 0.5, 0.3 - 0.4])
    assert f"a | 3 | 0.200 [" in r.stdout and f"| {diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]" in r.stdout
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "--against", "c"], capture_output=True, text=True)
    assert r.returncode != 0 and "valid: a, b" in r.stderr and r.stdout == ""
