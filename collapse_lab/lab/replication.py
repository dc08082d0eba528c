"""The call per base, and whether the bases agree (numpy/json only, no torch): the powered design's replication.

    python -m collapse_lab.lab.replication <ablation dir> [<ablation dir> ...] [--null <ablation dir>]
                                           [--within LO:HI] [--out FILE] [--plot FILE.png]

Each directory is one finished ablation (its report.json; one base each: `pretrain.seed` differs); a report.json or
report.json.gz file, or a directory holding report.json.gz, serves too (a kept copy of a base's report). For each
the primary pair's matched-KL comparison (report.json frontier.primary, else the first KL comparison of online RL
against FeedME): D, its interval, its half-width against the margin, the call, the closed forms' predicted call,
and how far each regime's curve lies off its own closed-form family at matched KL (the report's off_curve).
The bases AGREE when every call is the same and none is "undecided". Then the bases read as a SAMPLE of bases
(across_bases): do they differ by more than their own intervals explain (an F ratio), and what the design says
about bases in general (the base as a random effect: a t-interval over the per-base D's, k − 1 df). The same again
with every base's D recomputed on ONE KL range (on_common_range: the range every base reaches, or --within LO:HI),
so that bases are not compared over ranges that end in different places. With --null: the null world's collapsed
regimes, which must be none. Writes the table to stdout (and --out; --plot draws it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats

from collapse_lab.evaluation import matched
from collapse_lab.evaluation.matched import equivalence_call
from collapse_lab.evaluation.metrics import interval


def primary_comparison(report: dict) -> Optional[dict]:
    """The report's primary KL comparison (frontier.primary), else its first online-RL one at matched KL."""
    fr = report.get("frontier") or {}
    comps = [c for c in fr.get("comparisons", []) if c.get("x") == "kl"]
    primary = fr.get("primary")
    if primary:
        comps = [c for c in comps if f"{c['regime']}:{c['feedme']}" == primary]
    else:
        comps = [c for c in comps if c.get("group") == "online RL"] or comps
    return comps[0] if comps else None


def base_row(report: dict, comparison: Optional[dict] = None) -> dict:
    """One base's line: which base, the primary pair (or `comparison`), D and interval, half-width vs margin, call,
    the closed forms' predicted call (on the report's own range: not given for a `comparison`), and each regime's
    TV to its own closed form (A, B; where it is large the trained regime left the closed form)."""
    c = primary_comparison(report) if comparison is None else comparison
    lab = (report.get("config") or {}).get("lab") or []
    seed = next((o.split("=", 1)[1] for o in lab if o.startswith("pretrain.seed=")), "0")
    if c is None:
        return {"base": f"pretrain.seed={seed}", "pair": None, "call": "no comparison"}
    d = c["difference"]
    half = None if d.get("lo") is None else (d["hi"] - d["lo"]) / 2
    pred = {} if comparison is not None else next(
        (p for p in (report.get("closed_forms") or {}).get("predictions", [])
         if p["regime"] == c["regime"] and p["feedme"] == c["feedme"] and p["x"] == "kl"), {})
    return {"base": f"pretrain.seed={seed}", "pair": f"{c['regime']} vs {c['feedme']}", "mean": d.get("mean"),
            "lo": d.get("lo"), "hi": d.get("hi"), "half_width": half, "margin": report["frontier"]["margin"],
            "df": d.get("df", len(c.get("seeds", [])) - 1), "range": [c.get("x_min"), c.get("x_max")],
            "seeds": len(c.get("seeds", [])),
            "prompts": len((c.get("crossed") or {}).get("prompts", [])) or None, "call": c["call"],
            "predicted_call": pred.get("predicted_call"), "artefact": pred.get("artefact_difference"),
            "artefact_per_prompt": (pred.get("artefact_crossed") or {}).get("mean"),
            "tv": [((report.get("closed_forms") or {}).get("tracking") or {}).get(n, {}).get("tv_own")
                   for n in (c["regime"], c["feedme"])],
            "off": [((pred.get("off_curve") or {}).get(n) or {}).get("mean") for n in (c["regime"], c["feedme"])],
            "path_off": ((pred.get("gradient_path") or {}).get("off") or {}).get(c["regime"])}


def on_common_range(reports: list[dict], within: Optional[tuple[float, float]] = None) -> Optional[dict]:
    """Every base's primary D again, on ONE KL range: `within`, else the range every base reaches (the largest
    x_min and the smallest x_max of the bases' primary comparisons). Each base's own range differs, and D(KL)
    need not be flat, so bases compared on their own ranges can differ by where their ranges end; on one range
    they differ only by how the regimes behave there. Recomputed from the report's stored curves with the same
    per-prompt matched comparison (matched.crossed, narrowed to the range; a row's range is the part of it that
    its base reaches). {range, rows} (rows as base_row's, without the predicted call), or None without two
    bases' curves or a shared range."""
    comps = [(r, primary_comparison(r)) for r in reports]
    comps = [(r, c) for r, c in comps if c is not None and c.get("x_min") is not None
             and c["regime"] in (r["frontier"].get("curves") or {})]
    if len(comps) < 2:
        return None
    lo, hi = within or (max(c["x_min"] for _, c in comps), min(c["x_max"] for _, c in comps))
    if not hi > lo:
        return None
    rows = []
    for r, c in comps:
        fr = r["frontier"]
        cross = matched.crossed(fr["curves"][c["regime"]], fr["curves"][c["feedme"]], fr.get("grid_points", 8),
                                within=(lo, hi))
        if cross is None:
            rows.append(base_row(r, {**c, "difference": {"mean": None, "lo": None}, "call": "no common range"}))
            continue
        rows.append(base_row(r, {**c, "difference": cross["difference"], "crossed": cross,
                                 "x_min": max(lo, c["x_min"]), "x_max": min(hi, c["x_max"]),
                                 "call": matched.equivalence_call(cross["difference"], fr["margin"])}))
    return {"range": [lo, hi], "rows": rows}


def agreement(rows: list[dict]) -> str:
    calls = {r["call"] for r in rows}
    if len(rows) < 2:
        return "one base: no replication"
    if len(calls) == 1 and not calls & {"undecided", "one seed: no call", "no comparison", "no common range"}:
        return f"AGREE: every base calls '{calls.pop()}'"
    return "DISAGREE or undecided: " + "; ".join(f"{r['base']}: {r['call']}" for r in rows)


def across_bases(rows: list[dict], confidence: float = 0.95) -> Optional[dict]:
    """The bases as a sample of bases, from each base's D_b, half-width h_b and degrees of freedom ν_b (None with
    fewer than 2 decided rows).

        se_b  = h_b / t(1 − (1 − c)/2, ν_b)                 D_b's standard error within its base
        s²    = var_b(D_b),  m = mean_b se_b²               how far the D's spread; how far seeds and prompts alone
                                                            would spread them
        F     = s² / m,  p = P(F_{k−1, ν_m} ≥ F),  ν_m = (Σ se_b²)² / Σ (se_b⁴/ν_b)    (Satterthwaite)
                small p: the bases differ by more than their seeds and prompts explain
        D̄     = mean_b D_b ± t(1 − (1 − c)/2, k − 1)·s/√k   the base as a random effect
        call  = equivalence_call(D̄, margin)
        τ²    = max(0, s² − m)                              between-base variance (moments)
        K     = the fewest bases with t(1 − (1 − c)/2, K − 1)·√(max(s², m)/K) ≤ margin/2
                (at this design's seeds and prompts per base; None beyond 1000)

    Why not Cochran's Q = Σ (D_b − D̂)²/se_b² (D̂ weighted by 1/se_b²) against χ²_{k−1}: each se_b rests on a few
    seeds (ν_b ≈ 3 at 4 seeds), so its weights are noisy and Q is far larger than χ²_{k−1} even when the bases do
    not differ at all (tests/test_replication.py measures how often). The ratio above uses no weights; its
    denominator's uncertainty is in ν_m. With k = 2 bases t has one degree of freedom (12.7 at 95%): a claim
    about bases in general needs more bases, not more seeds per base."""
    rs = [r for r in rows if r.get("half_width") is not None and r.get("df")]
    if len(rs) < 2:
        return None
    t = lambda df: stats.t.ppf(0.5 + confidence / 2, df)  # noqa: E731
    k, d = len(rs), [r["mean"] for r in rs]
    se2 = [(r["half_width"] / t(r["df"])) ** 2 for r in rs]
    pooled = interval(d, confidence)
    s2 = sum((di - pooled["mean"]) ** 2 for di in d) / (k - 1)
    m = sum(se2) / k
    nu_m = sum(se2) ** 2 / sum(v * v / r["df"] for v, r in zip(se2, rs))
    margin = rs[0]["margin"]
    needed = next((n for n in range(2, 1001) if t(n - 1) * (max(s2, m) / n) ** 0.5 <= margin / 2), None)
    return {"bases": k, "f": float(s2 / m), "df": [k - 1, float(nu_m)], "p": float(stats.f.sf(s2 / m, k - 1, nu_m)),
            "tau": float(max(0.0, s2 - m)) ** 0.5, "bases_needed": needed, "mean": pooled["mean"], "lo": pooled["lo"],
            "hi": pooled["hi"], "call": equivalence_call(pooled, margin)}


CALLS = ("less entropy", "no difference", "undecided", "more entropy")


def call_chances(mean: float, sd: float, half_width: float, margin: float) -> dict[str, float]:
    """The chance of each equivalence_call for one base whose D estimate is drawn from N(mean, sd²), judged with a
    fixed half-width h and margin m (the call's regions on the estimate D):

        more entropy    D ≥ max(m, h)           (interval above 0 and mean ≥ m)
        less entropy    D ≤ −max(m, h)
        no difference   |D| ≤ m − h             (the whole interval inside ±m; empty when h ≥ m)
        undecided       the rest

    With sd² = τ² + se² (between-base and within-base variance) it is the chance for a NEW base of the same design."""
    cdf = lambda x: float(stats.norm.cdf(x, mean, sd)) if sd > 0 else float(x >= mean)  # noqa: E731
    edge = max(margin, half_width)
    inner = margin - half_width
    p = {"less entropy": cdf(-edge), "more entropy": 1.0 - cdf(edge),
         "no difference": max(0.0, cdf(inner) - cdf(-inner)) if inner > 0 else 0.0}
    p["undecided"] = max(0.0, 1.0 - sum(p.values()))
    return {c: p[c] for c in CALLS}


def agreement_chance(mean: float, sd: float, half_width: float, margin: float) -> float:
    """The chance that two independent bases, each as in call_chances, give the same DECIDED call (what `agreement`
    calls AGREE): Σ p_c² over "less entropy", "no difference" and "more entropy". At most 1 − p_undecided; near
    ±margin it cannot pass about one half, however small h is."""
    p = call_chances(mean, sd, half_width, margin)
    return sum(p[c] ** 2 for c in CALLS if c != "undecided")


def call_stability(ab: dict, rows: list[dict], confidence: float = 0.95) -> Optional[dict]:
    """Could the per-base calls have come out otherwise? Plug-in chances from across_bases: the mean D̄, τ, and the
    bases' mean within-base variance se² (half-widths h_b = t(ν_b)·se_b): a new base's D ~ N(D̄, τ² + se²) judged
    with h = t(ν̄)·se, ν̄ the mean df. {chances, agree} at this design; {chances_unlimited, agree_unlimited} with
    unlimited seeds and prompts per base (se = h = 0: only τ). Plug-in: D̄ and τ are themselves uncertain (with two
    bases very), so these are what the estimates imply, not a power analysis."""
    rs = [r for r in rows if r.get("half_width") is not None and r.get("df")]
    if ab is None or len(rs) < 2:
        return None
    t = lambda df: stats.t.ppf(0.5 + confidence / 2, df)  # noqa: E731
    se = float(np.mean([(r["half_width"] / t(r["df"])) ** 2 for r in rs])) ** 0.5
    h = float(t(np.mean([r["df"] for r in rs]))) * se
    sd = (ab["tau"] ** 2 + se ** 2) ** 0.5
    margin = rs[0]["margin"]
    return {"half_width": h, "sd": sd, "chances": call_chances(ab["mean"], sd, h, margin),
            "agree": agreement_chance(ab["mean"], sd, h, margin),
            "chances_unlimited": call_chances(ab["mean"], ab["tau"], 0.0, margin),
            "agree_unlimited": agreement_chance(ab["mean"], ab["tau"], 0.0, margin)}


def with_closed_form_distance(rows: list[dict]) -> Optional[dict]:
    """Does a base's D go with how far each regime ended from its own closed form? Per regime (a: A, b: B),
    Spearman's ρ between D_b and TV_b over the bases that have both, with its two-sided p: {a, b}, each None with
    fewer than 4 such bases or one TV for all; None when both are."""
    out = {}
    for i, name in enumerate(("a", "b")):
        pts = [(r["mean"], r["tv"][i]) for r in rows
               if r.get("mean") is not None and (r.get("tv") or [None, None])[i] is not None]
        if len(pts) < 4 or len({t for _, t in pts}) < 2:
            out[name] = None
            continue
        rho = stats.spearmanr([d for d, _ in pts], [t for _, t in pts])
        out[name] = {"rho": float(rho.statistic), "p": float(rho.pvalue), "bases": len(pts)}
    return out if any(out.values()) else None


def _reading(rows: list[dict]) -> list[str]:
    """The per-base table, whether the calls agree, and the bases as a sample (across_bases)."""
    f = lambda x, s="+.4f": "-" if x is None else format(x, s)  # noqa: E731
    md = ["| base | primary pair | KL range | seeds | prompts | D [95% interval] | half-width (margin) | call | "
          "predicted | artefact D | per prompt | TV to closed form (A / B) | off own curve (A / B) | "
          "A's gradient path off |",
          "|" + "---|" * 14]
    for r in rows:
        rng = r.get("range") or [None, None]
        md.append(f"| {r['base']} | {r.get('pair')} | [{f(rng[0], '.3f')}, {f(rng[1], '.3f')}] | "
                  f"{r.get('seeds', '-')} | "
                  f"{r.get('prompts') or '-'} | {f(r.get('mean'))} [{f(r.get('lo'))}, {f(r.get('hi'))}] | "
                  f"{f(r.get('half_width'), '.4f')} ({f(r.get('margin'), 'g')}) | {r['call']} | "
                  f"{r.get('predicted_call') or '-'} | {f(r.get('artefact'), '+.5f')} | "
                  f"{f(r.get('artefact_per_prompt'), '+.5f')} | "
                  f"{' / '.join(f(v, '.3f') for v in r.get('tv') or [None, None])} | "
                  f"{' / '.join(f(v) for v in r.get('off') or [None, None])} | {f(r.get('path_off'))} |")
    md += ["", agreement(rows)]
    ab = across_bases(rows)
    if ab is not None:
        differ = ("the bases differ by more than their seeds and prompts explain" if ab["p"] < 0.05
                  else "no evidence that the bases differ")
        md += ["", f"Across bases: the variance of the D's is {ab['f']:.2f} × what seeds and prompts explain "
               f"(F on {ab['df'][0]} and {ab['df'][1]:.1f} df, "
               f"p = {ab['p']:.2g}: {differ}). "
               f"The base as a random effect ({ab['bases']} bases): D {f(ab['mean'])} [{f(ab['lo'])}, {f(ab['hi'])}], "
               f"{ab['call']}. Between-base SD τ {ab['tau']:.4f}: a half-width of margin/2 needs about "
               f"{ab['bases_needed'] or 'over 1000'} bases at this design per base."]
        cs = call_stability(ab, rows)
        if cs is not None:
            say = lambda ch: ", ".join(f"{c} {ch[c]:.2f}" for c in CALLS if ch[c] >= 0.005)  # noqa: E731
            md += ["", f"Could the calls have come out otherwise? Plug-in, from D̄ {f(ab['mean'])}, τ {ab['tau']:.4f} "
                   f"and the bases' mean half-width {cs['half_width']:.4f}: a base of this design calls "
                   f"{say(cs['chances'])}, so two bases give the same decided call with chance {cs['agree']:.2f}; "
                   f"with unlimited seeds and prompts per base (only τ left) {say(cs['chances_unlimited'])}, "
                   f"chance {cs['agree_unlimited']:.2f}. D̄ and τ are estimates: these are what they imply."]
    off = [[r["off"][i] for r in rows if (r.get("off") or [None, None])[i] is not None] for i in (0, 1)]
    if min(len(o) for o in off) >= 2:
        a, b = (interval(o) for o in off)
        md += ["", f"Off its own closed-form curve at matched KL (pooled D = predicted + off A − off B), mean over "
               f"bases ({len(off[0])}): A {f(a['mean'])} [{f(a['lo'])}, {f(a['hi'])}], "
               f"B {f(b['mean'])} [{f(b['lo'])}, {f(b['hi'])}]."]
        paths = [(r["off"][0], r["path_off"]) for r in rows
                 if (r.get("off") or [None])[0] is not None and r.get("path_off")]
        if len(paths) >= 2:
            share = interval([o / p for o, p in paths])
            md[-1] += (f" A's exact softmax policy-gradient path lies {f(float(np.mean([p for _, p in paths])))} off "
                       f"A's family (its natural-gradient path: 0); A's measured offset is {share['mean']:.2f} "
                       f"[{share['lo']:.2f}, {share['hi']:.2f}] of its path's, mean over bases ({len(paths)}).")
    tv = with_closed_form_distance(rows)
    if tv is not None:
        said = [f"{label} ρ {x['rho']:+.2f} (p = {x['p']:.2g}, {x['bases']} bases)"
                for label, x in zip(("A", "B"), (tv["a"], tv["b"])) if x is not None]
        md += ["", "D against each regime's TV to its own closed form (Spearman, across bases): "
               + ", ".join(said) + "."]
    return md


def markdown(rows: list[dict], null: Optional[dict] = None, common: Optional[dict] = None) -> str:
    """The bases on their own ranges; with `common` (on_common_range), again on one range; with `null`, the null
    world's collapsed regimes."""
    md = _reading(rows)
    if common is not None:
        lo, hi = common["range"]
        md += ["", f"On one KL range for every base, [{lo:.3f}, {hi:.3f}] nats (D recomputed from each base's curves; "
               "the predicted call is for the base's own range only):", "", *_reading(common["rows"])]
    if null is not None:
        collapsed = (null.get("verdict") or {}).get("collapsed", [])
        md += ["", f"Null world ({null.get('ablation')}): collapsed regimes: {', '.join(collapsed) or 'none'} "
               f"({'as it should be' if not collapsed else 'SHOULD BE NONE: an artefact, not a preference'})."]
    return "\n".join(md) + "\n"


def forest_plot(rows: list[dict], path: Path, common: Optional[dict] = None) -> Path:
    """A forest plot: each base's D with its 95% interval, the bases as a random effect (the last line, a wider
    mark), the margin band ±m and 0; a second panel on the one common range when `common` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("each base on its own KL range", rows)]
    if common is not None:
        panels.append((f"on one range, {common['range'][0]:.2f}–{common['range'][1]:.2f} nats", common["rows"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.35 * len(rows) + 1.6), sharey=True,
                             squeeze=False)
    for ax, (title, rs) in zip(axes[0], panels):
        shown = [r for r in rs if r.get("mean") is not None]
        ab = across_bases(rs)
        lines = [(r["base"].split("=")[-1], r["mean"], r.get("lo"), r.get("hi"), "C0") for r in shown]
        if ab is not None:
            lines.append((f"all {ab['bases']}", ab["mean"], ab["lo"], ab["hi"], "C3"))
        for y, (_, m, lo, hi, colour) in enumerate(lines):
            if lo is not None:
                ax.plot([lo, hi], [y, y], color=colour, lw=3 if colour == "C3" else 1.5)
            ax.plot([m], [y], "D" if colour == "C3" else "o", color=colour)
        margin = (rs[0].get("margin") or 0.0) if rs else 0.0
        ax.axvspan(-margin, margin, color="0.9", zorder=0)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.set_yticks(range(len(lines)), [name for name, *_ in lines])
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.set_xlabel("D = d(A) − d(B) at matched KL")
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("base (pretrain.seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collapse_lab.lab.replication", description=__doc__.splitlines()[0])
    ap.add_argument("ablations", nargs="+", type=Path)
    ap.add_argument("--null", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="also draw the forest plot (a .png) here")
    ap.add_argument("--within", default=None, metavar="LO:HI",
                    help="the one KL range (nats) to compare every base on (default: the range every base reaches)")
    args = ap.parse_args(argv)
    within = None
    if args.within is not None:
        try:
            within = tuple(float(v) for v in args.within.split(":"))
        except ValueError:
            within = ()
        if len(within) != 2 or not 0 <= within[0] < within[1]:
            print(f"error: --within {args.within!r}: expected LO:HI in nats with 0 <= LO < HI, e.g. 0:1",
                  file=sys.stderr)
            return 2
    reports = []
    for d in args.ablations + ([args.null] if args.null else []):
        path = d if d.is_file() else next((d / n for n in ("report.json", "report.json.gz") if (d / n).is_file()), None)
        if path is None:
            print(f"error: {d / 'report.json'} not found (run `collapse-lab report {d}` or the ablation first)",
                  file=sys.stderr)
            return 2
        reports.append(json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text()))
    null = reports.pop() if args.null else None
    common = on_common_range(reports, within) if len(reports) > 1 else None
    rows = [base_row(r) for r in reports]
    text = markdown(rows, null, common)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.plot:
        forest_plot(rows, args.plot, common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
