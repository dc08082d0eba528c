"""The report's verdict: the two questions (matched distance first, end points second) answered in words
from the statistics, with the closed forms' call and the design's power beside the measured call."""

from __future__ import annotations

from collapse_lab.core.names import ONLINE
from collapse_lab.lab.report.markdown import _cell, _fmt, power_statement


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
             f"artefact {_cell(p.get('artefact_difference'), '+.5f')}"
             + (f", per prompt {p['artefact_crossed']['mean']:+.5f}" if p.get("artefact_crossed") else "") + ")"
             for p in preds]
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