"""Two regimes compared at MATCHED distance from the base, from their measured curves (numpy only, no torch).

Each regime at each seed is a curve of measured points (x, d) along its training: x = KL(q ‖ q0) (nats) or the
gold gain, d = Δ(H/log|A|) (collapse_lab/evaluation/frontier.py). The comparison of A with B, paired by seed:

    range    [x_lo, x_hi], x_lo = the LARGEST first measured x and x_hi = the SMALLEST last measured x over
             every seed of both regimes: each grid point has measured points of every curve on both sides.
             The base's (0, 0) is not a measured point of a regime: a chord from it to a first point at
             KL 0.8 lies above the true curve (d ≈ −c·√KL near the base), which biased D by ~2/3 of the margin.
    grid     `grid_points` values from x_lo to x_hi, evenly spaced in √x for KL (in x for the gold gain)
    d(x)     linear between a curve's measured points, in √KL for KL (nearly exact where d ≈ −c·√KL)
    D_s      mean over the grid of d_A(x) − d_B(x), per seed; D: its t-interval across seeds
    call     equivalence_call(D, margin)
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from collapse_lab.evaluation.metrics import interval

# the along-training curve's row keys (collapse_lab/evaluation/frontier.py writes them into metrics.jsonl)
KEYS = ("frontier/kl", "frontier/delta_norm_entropy", "frontier/norm_entropy", "frontier/cross_term",
        "frontier/gold", "frontier/valid_mass")


def curve_points(rows: list[dict], x: str = "frontier/kl", d: str = "frontier/delta_norm_entropy") -> list[tuple[float, float]]:
    """(x, d) of every along-training row that has both (x = frontier/kl or frontier/gold_gain,
    d = frontier/delta_norm_entropy; per prompt: their /<prompt id> keys): MEASURED points only, the base's
    (0, 0) not among them."""
    return [(float(r[x]), float(r[d])) for r in rows if r.get(x) is not None and r.get(d) is not None]


def _scale(sqrt_x: bool):
    return (lambda v: np.sqrt(np.clip(np.asarray(v, dtype=np.float64), 0.0, None))) if sqrt_x else \
        (lambda v: np.asarray(v, dtype=np.float64))


def interpolate(points: list[tuple[float, float]], grid, sqrt_x: bool = False) -> np.ndarray:
    """d at each x of `grid`, linear between the curve's points ordered by x (points at the same x averaged),
    in √x when `sqrt_x`: a curve is read as d as a function of distance, whatever order training visited it in.
    Outside the points' range: the end value (matched() never asks there)."""
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ds = np.array([p[1] for p in points], dtype=np.float64)
    ux, inv = np.unique(xs, return_inverse=True)
    ud = np.bincount(inv, weights=ds) / np.bincount(inv)
    t = _scale(sqrt_x)
    return np.interp(t(grid), t(ux), ud)


def common_range(curves: list[list[tuple[float, float]]]) -> tuple[float, float]:
    """(x_lo, x_hi): the largest first and the smallest last measured x over `curves`."""
    return max(min(p[0] for p in c) for c in curves), min(max(p[0] for p in c) for c in curves)


def grid_between(lo: float, hi: float, n: int, sqrt_x: bool) -> np.ndarray:
    """n points from lo to hi inclusive, evenly spaced in √x when sqrt_x (n = 1: the midpoint)."""
    if n == 1:
        return np.array([(lo + hi) / 2])
    if sqrt_x:
        return np.linspace(math.sqrt(max(lo, 0.0)), math.sqrt(hi), n) ** 2
    return np.linspace(lo, hi, n)


def matched(a: dict[int, list[tuple[float, float]]], b: dict[int, list[tuple[float, float]]], grid_points: int = 8,
            confidence: float = 0.95, sqrt_x: bool = True,
            within: Optional[tuple[float, float]] = None) -> Optional[dict]:
    """Regime A vs regime B at matched x, paired by seed (module docstring): `a`, `b` map seed -> measured points.
    `within` = (lo, hi) narrows the range to its part inside [lo, hi] (a range shared by several bases).

    Returns {grid, x_min, x_max, seeds, per_seed, difference (interval of D_s across seeds), at_grid (interval per
    grid point)}, or None when no seed is common, a curve has no point, or the curves share no range."""
    seeds = sorted(s for s in set(a) & set(b) if a[s] and b[s])
    if not seeds:
        return None
    x_lo, x_hi = common_range([c[s] for c in (a, b) for s in seeds])
    if within is not None:
        x_lo, x_hi = max(x_lo, within[0]), min(x_hi, within[1])
    if not x_hi > x_lo:
        return None
    grid = grid_between(x_lo, x_hi, grid_points, sqrt_x)
    diffs = {s: interpolate(a[s], grid, sqrt_x) - interpolate(b[s], grid, sqrt_x) for s in seeds}
    return {"grid": grid.tolist(), "x_min": float(x_lo), "x_max": float(x_hi), "seeds": seeds,
            "per_seed": {s: float(d.mean()) for s, d in diffs.items()},
            "difference": interval([float(d.mean()) for d in diffs.values()], confidence),
            "at_grid": [interval([float(diffs[s][i]) for s in seeds], confidence) for i in range(len(grid))]}


def equivalence_call(diff: dict, margin: float) -> str:
    """The call on D (A minus B, positive: A keeps more entropy at the same distance), from its interval:
    "more entropy" (interval above 0, mean ≥ margin), "less entropy" (interval below 0, mean ≤ −margin),
    "no difference" (the whole interval inside [−margin, +margin]: equivalent within the margin, a TOST at
    the interval's level), "undecided" otherwise; "one seed: no call" without an interval across seeds."""
    if diff["lo"] is None:
        return "one seed: no call"
    if diff["lo"] > 0 and diff["mean"] >= margin:
        return "more entropy"
    if diff["hi"] < 0 and diff["mean"] <= -margin:
        return "less entropy"
    if diff["lo"] >= -margin and diff["hi"] <= margin:
        return "no difference"
    return "undecided"


def artefact_difference(a: dict[int, list[tuple[float, float]]], b: dict[int, list[tuple[float, float]]],
                        reference, grid_points: int = 8, sqrt_x: bool = True) -> Optional[float]:
    """The interpolation artefact of `matched` on these measured x values: every point's d replaced by
    `reference(x)` (one exact curve for BOTH regimes, so the true D is 0); returns the D that matched() then
    finds (None without a common range). |D| must stay far below the margin."""
    on = lambda c: {s: [(x, float(reference(x))) for x, _ in pts] for s, pts in c.items()}  # noqa: E731
    m = matched(on(a), on(b), grid_points, sqrt_x=sqrt_x)
    return None if m is None else m["difference"]["mean"]


def off_curve(a: dict[int, list[tuple[float, float]]], reference, grid, confidence: float = 0.95,
              sqrt_x: bool = True) -> Optional[dict]:
    """How far one regime's measured curves lie from an exact reference curve at matched distance: per seed s,
    off_s = mean over `grid` of [d_s(x) − reference(x)] (d_s interpolated as matched() does), with an interval
    across seeds. On a pair's own grid, with each regime against its own closed-form family, the pooled D splits
    exactly: D = predicted D + off(A) − off(B), so a measured D the closed forms did not predict is laid at the
    door of the regime(s) whose curve left its family. None where the reference does not reach the grid."""
    grid = np.asarray(grid, dtype=np.float64)
    ref = np.asarray(reference(grid), dtype=np.float64)
    if grid.size == 0 or np.isnan(ref).any() or not a:
        return None
    return interval([float((interpolate(pts, grid, sqrt_x) - ref).mean()) for pts in a.values()], confidence)


# ------------------------------------------------------------------- prompts as a random effect


def crossed_interval(d, confidence: float = 0.95) -> dict:
    """The grand mean of an (S seeds × P prompts) table of differences D_sp and its interval, with seeds AND prompts
    as crossed random effects: D_sp = μ + a_s + b_p + e_sp, so a replication with other seeds and other prompts of
    the same kind would vary by

        Var(D̄) = σ_a²/S + σ_b²/P + σ_e²/(SP) = (MS_S + MS_P − MS_E)/(SP)

    (two-way ANOVA mean squares: MS_S = P·Σ_s(D̄_s − D̄)²/(S−1), MS_P = S·Σ_p(D̄_p − D̄)²/(P−1), MS_E the
    residual's over (S−1)(P−1)), floored at MS_E/(SP), with Satterthwaite's degrees of freedom. With one prompt it
    is the across-seed t-interval. {mean, lo, hi, n (seeds), prompts, df}."""
    from scipy import stats

    d = np.asarray(d, dtype=np.float64)
    S, P = d.shape
    mean = float(d.mean())
    if S < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": S, "prompts": P, "df": None}
    if P == 1:
        iv = interval(list(d[:, 0]), confidence)
        return {**iv, "prompts": 1, "df": S - 1}
    rs, cs = d.mean(1), d.mean(0)
    ms_s = P * ((rs - mean) ** 2).sum() / (S - 1)
    ms_p = S * ((cs - mean) ** 2).sum() / (P - 1)
    resid = d - rs[:, None] - cs[None, :] + mean
    ms_e = (resid ** 2).sum() / ((S - 1) * (P - 1))
    num = max(ms_s + ms_p - ms_e, ms_e)
    den = ms_s ** 2 / (S - 1) + ms_p ** 2 / (P - 1) + ms_e ** 2 / ((S - 1) * (P - 1))
    df = max(1.0, num ** 2 / den) if den > 0 else float(S - 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(num / (S * P)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": S, "prompts": P, "df": float(df)}


def crossed(a_rows: dict[int, list[dict]], b_rows: dict[int, list[dict]], grid_points: int = 8,
            confidence: float = 0.95, within: Optional[tuple[float, float]] = None) -> Optional[dict]:
    """A vs B at matched KL PER PROMPT (each prompt's own KL and d: the rows' frontier/kl/<id> and
    frontier/delta_norm_entropy/<id>; each prompt's range narrowed to `within`, as in matched), then
    crossed_interval over the seeds × prompts table. A prompt on which the curves share no range is left out
    (listed). None without per-prompt rows or a common seed."""
    seeds = sorted(set(a_rows) & set(b_rows))
    ids = sorted({k.split("/", 2)[2] for rows in list(a_rows.values()) + list(b_rows.values()) for r in rows
                  for k in r if k.startswith("frontier/kl/")})
    if not seeds or not ids:
        return None
    table, used, dropped = [], [], []
    for pid in ids:
        pts = [{s: curve_points(c[s], f"frontier/kl/{pid}", f"frontier/delta_norm_entropy/{pid}") for s in seeds}
               for c in (a_rows, b_rows)]
        m = matched(*pts, grid_points, confidence, within=within)
        if m is None or m["seeds"] != seeds:
            dropped.append(pid)
            continue
        table.append([m["per_seed"][s] for s in seeds])
        used.append(pid)
    if not used:
        return None
    return {"difference": crossed_interval(np.array(table).T, confidence), "prompts": used, "dropped": dropped,
            "seeds": seeds}
