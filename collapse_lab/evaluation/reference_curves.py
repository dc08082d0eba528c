"""Closed-form reference curves: where each IDEAL regime lies in the (KL, ΔH) plane (numpy only, no torch).

Per prompt the inputs are the base's exact distribution over OUTCOMES y (each answer of the answer set A
ended with EOS, then each ended otherwise, then "other": the mass outside A) and the rater's score of each:
μ(y) its noiseless score, R(y) = E[r|y] its expected score (noise, clipping and rounding integrated out,
world.noisy_score_mean), P(s|y) the probability of each integer score s (the FeedME selection sees these).
A policy's point is read on the answer set: q(a) = (its EOS-ended + otherwise-ended mass of a) / Σ over A,

    KL = KL(q ‖ q0),   d = (H(q) − H(q0)) / log|A|,   gold gain = E_q[R] − E_q0[R],

means over the prompts (as collapse_lab/evaluation/frontier.py measures trained regimes). The families:

    best-of-k      P(y) = π0(y)/π0(S(y)) · [G(≤μ(y))^k − G(<μ(y))^k]     (ties S(y) split ∝ π0; G the base's
                   distribution of μ; "other" below every answer). Ranking by μ is ranking by R (R is strictly
                   increasing in μ). Real k ≥ 1 interpolates the integer ladder smoothly.
    FeedME         the expected selection of top-1-of-k on NOISY integer ratings, ties uniform among the tied
                   samples (collapse_lab/regimes/sft.py select_top):
                   P(y) = Σ_s π0(y)·P(s|y)/G_s(s) · [G_s(≤s)^k − G_s(<s)^k],  G_s the base's score distribution;
                   iterated rounds apply it to the previous round's selection (a perfectly fitted round).
    π*_β           π*(y) ∝ π0(y)·exp(R(y)/β)                 (KL-regularised reward maximisation)
    π*_{β,α}       π*(y) ∝ π0(y)^{β/(α+β)}·exp(R(y)/(α+β))   (with an entropy bonus α)

Matched comparison of two curves: d of each interpolated at the same KL, linearly in √KL (near the base
d ≈ −c·√KL, so a chord in √KL is nearly exact where a chord in KL from (0, 0) is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

KL_MAX = 3.0  # nats: the largest KL the reference families are traced to (and separations searched over)


# ------------------------------------------------------------------------------------ distributions


def normalise(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p / p.sum()


def entropy(q) -> float:
    """H(q) = −Σ q log q (nats), 0·log 0 = 0."""
    q = np.asarray(q, dtype=np.float64)
    nz = q > 0
    return float(-(q[nz] * np.log(q[nz])).sum())


def kl(q, q0) -> float:
    """KL(q ‖ q0) = Σ q·log(q/q0) (nats), terms with q = 0 are 0."""
    q, q0 = np.asarray(q, dtype=np.float64), np.asarray(q0, dtype=np.float64)
    nz = q > 0
    return float((q[nz] * (np.log(q[nz]) - np.log(q0[nz]))).sum())


def best_of_k(p, scores, k: float) -> np.ndarray:
    """Best of k i.i.d. samples of p by `scores`, ties split ∝ p: π0(y)/π0(S(y))·[G(≤s)^k − G(<s)^k].

    p: (N,) probabilities summing to 1; scores: (N,); k ≥ 1 (real k: the same formula). (N,) result."""
    p, s = np.asarray(p, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if p.shape != s.shape or p.ndim != 1 or k < 1 or (p < 0).any():
        raise ValueError(f"need (N,) probs >= 0 and (N,) scores, k >= 1; got {p.shape}, {s.shape}, k={k}")
    p = p / p.sum()
    levels, level_of = np.unique(s, return_inverse=True)
    mass = np.bincount(level_of, weights=p, minlength=len(levels))
    at_most = np.minimum(np.cumsum(mass), 1.0)
    top_is = at_most ** k - (at_most - mass).clip(0.0) ** k
    share = np.divide(p, mass[level_of], out=np.zeros_like(p), where=mass[level_of] > 0)
    return share * top_is[level_of]


def score_level_probs(mu, sigma: float, integer: bool = True, low: float = 1.0, high: float = 7.0) -> np.ndarray:
    """(N, L) P(s = level | μ) of the noisy integer rating round(clip(μ + ε, low, high)), ε ~ N(0, σ²), levels
    low..high; the two ends take the tails. σ = 0 (or a non-integer rater: ranked by μ alone, as best-of-k):
    all mass on round(clip(μ)) for integer ratings."""
    from scipy.special import ndtr  # Φ

    mu = np.asarray(mu, dtype=np.float64)
    levels = np.arange(int(math.ceil(low)), int(math.floor(high)) + 1, dtype=np.float64)
    if not integer:
        raise ValueError("score_level_probs is for integer ratings; a continuous rater ranks like best_of_k on R")
    if sigma <= 0:
        idx = np.clip(np.round(np.clip(mu, low, high)) - levels[0], 0, len(levels) - 1).astype(int)
        return np.eye(len(levels))[idx]
    upper = ndtr((levels[None, :] + 0.5 - mu[:, None]) / sigma)
    lower = ndtr((levels[None, :] - 0.5 - mu[:, None]) / sigma)
    upper[:, -1], lower[:, 0] = 1.0, 0.0
    return upper - lower


def noisy_best_of_k(p, level_probs, k: float) -> np.ndarray:
    """The kept sample's distribution when k i.i.d. samples of p are rated with noise (rows of `level_probs`:
    P(s|y) over ordered levels, lowest first) and the top-rated one is kept, ties uniform among the tied:

        P(y) = Σ_s p(y)·P(s|y) / G(s) · [G(≤s)^k − G(<s)^k],   G(s) = Σ_y p(y)·P(s|y).
    """
    p, ls = normalise(p), np.asarray(level_probs, dtype=np.float64)  # renormalised: no drift over many rounds
    if ls.shape[0] != p.shape[0] or k < 1:
        raise ValueError(f"need (N,) probs, (N, L) level probabilities and k >= 1; got {p.shape}, {ls.shape}, k={k}")
    g = p @ ls  # (L,)
    at_most = np.minimum(np.cumsum(g), 1.0)
    top_is = at_most ** k - (at_most - g).clip(0.0) ** k  # (L,) P(the best rating is s)
    per_level = np.divide(top_is, g, out=np.zeros_like(g), where=g > 0)
    return p * (ls @ per_level)


def feedme_selection(p, level_probs, k: float, rounds: int = 1) -> np.ndarray:
    """FeedME's expected selection after `rounds` perfectly fitted rounds: noisy_best_of_k applied `rounds` times."""
    q = np.asarray(p, dtype=np.float64)
    for _ in range(rounds):
        q = noisy_best_of_k(q, level_probs, k)
    return q


def optimum(p, scores, beta: float, alpha: float = 0.0) -> np.ndarray:
    """π*(y) ∝ p(y)^{β/(α+β)}·exp(R(y)/(α+β)) (α = 0: p·e^{R/β}); outcomes with p = 0 stay 0. β = α = 0:
    the best-scored outcomes ∝ p (the limit β → 0)."""
    p, r = np.asarray(p, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if beta < 0 or alpha < 0:
        raise ValueError(f"beta and alpha must be >= 0, got {beta}, {alpha}")
    support = p > 0
    if beta + alpha == 0:
        best = support & (r >= r[support].max())
        return normalise(np.where(best, p, 0.0))
    tau = alpha + beta
    z = np.full_like(p, -np.inf)
    z[support] = (beta / tau) * np.log(p[support]) + r[support] / tau
    z -= z[support].max()
    return normalise(np.exp(z))


# ----------------------------------------------------------------------------------- one prompt


@dataclass
class PromptForms:
    """One prompt's closed-form inputs over its outcomes: 2|A| answer outcomes (EOS-ended, then otherwise
    ended) and "other" last. p0 (2|A|+1,) the base's probabilities; mu, mean (2|A|+1,) the noiseless and
    expected scores ("other" below every answer: −inf / the lowest); level_probs (2|A|+1, L) P(s|y)."""

    id: str
    p0: np.ndarray
    mu: np.ndarray
    mean: np.ndarray
    level_probs: np.ndarray

    @property
    def n_answers(self) -> int:
        return (len(self.p0) - 1) // 2

    def answers(self, outcome_probs) -> np.ndarray:
        """(A,) the answer distribution of an outcome distribution, normalised over the answer set."""
        q = np.asarray(outcome_probs, dtype=np.float64)
        n = self.n_answers
        return normalise(q[:n] + q[n:2 * n])

    def gold(self, outcome_probs) -> float:
        """E[R] of the outcome distribution normalised over the answer outcomes (as frontier/gold)."""
        q = np.asarray(outcome_probs, dtype=np.float64)[:-1]
        return float((q * self.mean[:-1]).sum() / q.sum())


def prompt_forms(pid: str, eos_probs, other_end_probs, mu_clean, mu_other, mean_clean, mean_other, sigma: float,
                 integer: bool = True, low: float = 1.0, high: float = 7.0) -> PromptForms:
    """PromptForms from the base's exact (A,) EOS-ended and otherwise-ended answer masses and the rater's (A,)
    scores of each; "other" gets 1 − Σ of both and a score below all answers (the lab's gold rater scores every
    completion outside the answer set at most 4 and every answer outcome at least 5)."""
    eos, oth = np.asarray(eos_probs, float), np.asarray(other_end_probs, float)
    p0 = np.concatenate([eos, oth, [max(0.0, 1.0 - eos.sum() - oth.sum())]])
    mu = np.concatenate([mu_clean, mu_other, [-np.inf]]).astype(float)
    mean = np.concatenate([mean_clean, mean_other, [low]]).astype(float)
    finite = np.where(np.isfinite(mu), mu, low - 10.0)
    levels = score_level_probs(finite, sigma, integer, low, high) if integer else None
    if levels is None:  # continuous ratings rank like the noiseless score up to noise: use μ's ranks as levels
        ranks = np.unique(finite, return_inverse=True)[1]
        levels = np.eye(ranks.max() + 1)[ranks]
    levels = np.concatenate([np.zeros((len(p0), 1)), levels], axis=1)
    levels[-1] = 0.0
    levels[-1, 0] = 1.0  # "other": its own lowest level, below every answer outcome
    return PromptForms(pid, p0, mu, mean, levels)


def forms_from_json(data: dict) -> list[PromptForms]:
    """The PromptForms of a reference_curves.json "base" section (collapse_lab/frontier.Curve.base_forms)."""
    r = data["rater"]
    return [prompt_forms(p["id"], p["eos_probs"], p["other_end_probs"], p["mu_clean"], p["mu_other"], p["mean_clean"],
                         p["mean_other"], float(r["noise_std"]), bool(r["integer_scores"])) for p in data["prompts"]]


# --------------------------------------------------------------------------------- the families


def point(forms: Sequence[PromptForms], policy: Callable[[PromptForms], np.ndarray]) -> dict:
    """One reference point: means over the prompts of KL, d, gold gain of `policy(prompt) -> outcome probs`."""
    kls, ds, gains = [], [], []
    for f in forms:
        q, q0 = f.answers(policy(f)), f.answers(f.p0)
        kls.append(kl(q, q0))
        ds.append((entropy(q) - entropy(q0)) / math.log(len(q)))
        gains.append(f.gold(policy(f)) - f.gold(f.p0))
    return {"kl": float(np.mean(kls)), "d": float(np.mean(ds)), "gold_gain": float(np.mean(gains))}


def family(forms: Sequence[PromptForms], name: str, param: str, values: Sequence[float],
           policy: Callable[[PromptForms, float], np.ndarray], kl_max: float = KL_MAX) -> list[dict]:
    """[{param, kl, d, gold_gain}] along `values`, stopping after the first point beyond kl_max."""
    out = []
    for v in values:
        out.append({"family": name, param: float(v), **point(forms, lambda f: policy(f, v))})
        if out[-1]["kl"] > kl_max:
            break
    return out


def best_of_k_curve(forms, ks=None, kl_max: float = KL_MAX) -> list[dict]:
    ks = np.geomspace(1, 1e6, 241) if ks is None else ks
    return family(forms, "best_of_k", "k", ks, lambda f, k: best_of_k(f.p0, f.mu, k), kl_max)


def feedme_curve(forms, k: int, max_rounds: int = 200, kl_max: float = KL_MAX, steps: int = 40) -> list[dict]:
    """FeedME's expected selection: one round at k' growing from 1 to k (real k'), then rounds 2, 3, ... at k."""
    out = family(forms, "feedme", "k", np.geomspace(1, k, steps), lambda f, kk: noisy_best_of_k(f.p0, f.level_probs, kk),
                 kl_max)
    for x in out:
        x["rounds"] = 1
    if out[-1]["kl"] > kl_max:
        return out
    cache = {f.id: noisy_best_of_k(f.p0, f.level_probs, k) for f in forms}
    for rnd in range(2, max_rounds + 1):
        cache = {f.id: noisy_best_of_k(cache[f.id], f.level_probs, k) for f in forms}
        out.append({"family": "feedme", "k": float(k), "rounds": rnd, **point(forms, lambda f: cache[f.id])})
        if out[-1]["kl"] > kl_max or abs(out[-1]["kl"] - out[-2]["kl"]) < 1e-6:
            break
    return out


def optimum_curve(forms, alpha: float = 0.0, betas=None, kl_max: float = KL_MAX,
                  scores: Optional[Callable[[PromptForms], np.ndarray]] = None) -> list[dict]:
    """π*_β (α = 0) or π*_{β,α} over a β ladder from large to small; `scores`: R per prompt (default: f.mean)."""
    betas = np.geomspace(100.0, 1e-3, 241) if betas is None else betas
    r = scores or (lambda f: f.mean)
    name = "optimum_beta" if alpha == 0 else "optimum_beta_alpha"
    out = family(forms, name, "beta", betas, lambda f, b: optimum(f.p0, r(f), b, alpha), kl_max)
    for x in out:
        x["alpha"] = float(alpha)
    return out


def masked_softmax(theta, live) -> np.ndarray:
    """softmax(θ) over the outcomes where `live` is true; 0 elsewhere (outcomes the base never produces)."""
    z = np.where(live, theta, -np.inf)
    q = np.exp(z - z.max())
    return q / q.sum()


def policy_gradient(q, log_p0, scores, beta: float, alpha: float = 0.0, natural: bool = False) -> np.ndarray:
    """∂J/∂θ for the softmax policy q = softmax(θ) over outcomes, J(θ) = E_q[R] − β·KL(q‖π0) + α·H(q):

        vanilla:  q(y)·(a(y) − E_q[a]),   a(y) = R(y) − β·log(q(y)/π0(y)) − α·log q(y)
        natural:  a(y) − E_q[a]           (F⁺·∂J/∂θ, F = diag(q) − q·qᵀ the softmax's Fisher matrix)

    Both are 0 exactly at π*_{β,α} (there a(y) = (α+β)·log Z for every y). Outcomes with q = 0 get 0."""
    q = np.asarray(q, dtype=np.float64)
    on = q > 0
    logq = np.log(np.where(on, q, 1.0))
    a = np.where(on, np.asarray(scores, float) - beta * (logq - np.asarray(log_p0, float)) - alpha * logq, 0.0)
    adv = np.where(on, a - (q * a).sum(), 0.0)
    return adv if natural else q * adv


def gradient_path(forms, beta: float, alpha: float = 0.0, natural: bool = False, kl_max: float = KL_MAX,
                  max_change: float = 0.01, record_every: float = 0.01, patience: int = 2000,
                  max_steps: int = 200_000) -> list[dict]:
    """The PATH of exact policy-gradient ascent from the base on J(q) = E_q[R] − β·KL(q‖π0) + α·H(q), for a policy
    that is a softmax over each prompt's outcomes (one free logit θ(y) per outcome), every prompt on one clock:

        vanilla:  dθ(y)/dt = q(y)·(a(y) − E_q[a])        a(y) = R(y) − β·log(q(y)/π0(y)) − α·log q(y)
        natural:  dθ(y)/dt =       a(y) − E_q[a]         (the Fisher-preconditioned step: mirror descent's flow)

    Both are ∂J/∂θ (the natural one times the inverse Fisher) and both end at π*_{β,α}. The natural path is
    π*_{β',α}'s family itself (θ_t moves on the line from log π0 to π*'s logits: β' runs from ∞ down to β), so
    the family is where an optimiser with that geometry passes on its way. The vanilla step weights each
    outcome's move by its own probability: of two answers with the same score the likelier gains faster, so
    where good answers differ in prior mass its path tends to concentrate sooner than the family at the same KL
    (and may pass π*'s KL before it settles, as the unlikely answers' logits catch up slowly). A parametric policy
    trained by SGD/Adam (PPO, RLOO, GRPO) has neither geometry exactly; these two paths are tabular references.

    Euler steps along the flow, each moving no logit by more than `max_change` (the path, not the clock, is
    what is returned). The path's KL need not rise monotonically (the vanilla one dips and overshoots), so it is
    read at FIRST PASSAGE: a point wherever √KL first exceeds the last point's by `record_every`, d as it was
    then. Ends past `kl_max`, at π* (within 1e-4 in TV), or when no new KL was reached for `patience` steps (a
    plateau: the unlikely outcomes' logits creep up ∝ their probability); in the last two cases π* itself, the
    flow's limit, is the last point ("limit": true) unless the path has already passed its KL.
    Points {family, beta, alpha, t, kl, d, gold_gain}."""
    if beta < 0 or alpha < 0 or beta + alpha == 0:
        raise ValueError(f"gradient_path needs beta, alpha >= 0 with beta + alpha > 0; got {beta}, {alpha}")
    tau = beta + alpha
    lp0 = [np.log(np.where(f.p0 > 0, f.p0, 1.0)) for f in forms]
    theta = [x.copy() for x in lp0]
    live = [f.p0 > 0 for f in forms]  # outcomes the base never produces stay at 0 (no logit to move)
    targets = [optimum(f.p0, f.mean, beta, alpha) for f in forms]
    name = "natural_gradient_path" if natural else "gradient_path"
    out, t = [], 0.0
    last, since = None, 0  # the last point computed; steps since the path last reached a new KL
    for _ in range(max_steps):
        qs = [masked_softmax(th, on) for th, on in zip(theta, live)]
        last = {"family": name, "beta": float(beta), "alpha": float(alpha), "t": t,
                **point(forms, lambda f, by={f.id: q for f, q in zip(forms, qs)}: by[f.id])}
        since += 1
        if not out or math.sqrt(max(last["kl"], 0.0)) - math.sqrt(max(out[-1]["kl"], 0.0)) >= record_every:
            out.append(last)  # first passage: d where the path first reaches this KL
            since = 0
        if last["kl"] > kl_max:
            break
        arrived = max(tv_to(q, p) for q, p in zip(qs, targets)) < 1e-4
        if arrived or since > patience:  # end at π*, the flow's limit, where the path has not yet passed its KL
            star = point(forms, lambda f, by={f.id: p for f, p in zip(forms, targets)}: by[f.id])
            if star["kl"] > out[-1]["kl"]:
                out.append({**last, **star, "limit": True})
            break
        grads = [policy_gradient(q, base, f.mean, beta, alpha, natural) for q, base, f in zip(qs, lp0, forms)]
        h = min(0.1 / tau, max_change / max(float(np.abs(g).max()) for g in grads))
        theta = [th + h * g for th, g in zip(theta, grads)]
        t += h
    return out


def reference_families(forms, feedme_k: int, alphas: Sequence[float] = (), kl_max: float = KL_MAX) -> dict:
    """Every reference family of the base: {name: [points]} (π*_{β,α} once per α in `alphas`)."""
    out = {"best_of_k": best_of_k_curve(forms, kl_max=kl_max), "feedme": feedme_curve(forms, feedme_k, kl_max=kl_max),
           "optimum_beta": optimum_curve(forms, kl_max=kl_max)}
    for a in alphas:
        if a > 0:
            out[f"optimum_beta_alpha{a:g}"] = optimum_curve(forms, alpha=a, kl_max=kl_max)
    return out


# ------------------------------------------------------------------------- reading curves at matched KL


def d_at(curve: Sequence[dict], kl_values, x: str = "kl") -> np.ndarray:
    """d of a reference curve at each KL (x = "kl", linear in √KL between its points, (0, 0) first) or gold gain
    (x = "gold_gain", linear); NaN outside the curve's range."""
    xs = np.array([0.0] + [c[x] for c in curve])
    ds = np.array([0.0] + [c["d"] for c in curve])
    order = np.argsort(xs, kind="stable")
    xs, ds = xs[order], ds[order]
    t = (lambda v: np.sqrt(np.clip(v, 0.0, None))) if x == "kl" else (lambda v: np.asarray(v, float))
    v = np.asarray(kl_values, dtype=np.float64)
    out = np.interp(t(v), t(xs), ds)
    return np.where((v < xs[0]) | (v > xs[-1]), np.nan, out)


def separation(a: Sequence[dict], b: Sequence[dict], kl_max: float = KL_MAX, n: int = 400) -> dict:
    """The largest |d_a − d_b| at matched KL in (0, min(kl_max, both curves' largest KL)]: {value, at_kl, kl_hi}."""
    hi = min(kl_max, max(c["kl"] for c in a), max(c["kl"] for c in b))
    if not hi > 0:
        return {"value": None, "at_kl": None, "kl_hi": hi}
    grid = np.linspace(0.0, math.sqrt(hi), n + 1)[1:] ** 2
    diff = np.abs(d_at(a, grid) - d_at(b, grid))
    i = int(np.nanargmax(diff))
    return {"value": float(diff[i]), "at_kl": float(grid[i]), "kl_hi": float(hi)}


def predicted_difference(a: Sequence[dict], b: Sequence[dict], grid, x: str = "kl") -> Optional[float]:
    """D predicted by the closed forms on a matched grid: mean over the grid of d_a − d_b (None off the curves)."""
    if grid is None or len(grid) == 0:
        return None
    diff = d_at(a, grid, x) - d_at(b, grid, x)
    return None if np.isnan(diff).any() else float(diff.mean())


def predicted_call(diff: Optional[float], margin: float) -> str:
    """The call the closed forms predict from D alone (no sampling error): more/less entropy beyond ±margin,
    else no difference."""
    if diff is None:
        return "no prediction (off the reference curves)"
    return "more entropy" if diff >= margin else "less entropy" if diff <= -margin else "no difference"


def tv_to(policy_answers, target_answers) -> float:
    """TV between two answer distributions, each normalised over the answer set: ½·Σ|p − q|."""
    return float(0.5 * np.abs(normalise(policy_answers) - normalise(target_answers)).sum())


# --------------------------------------------------------------------------- the report's closed forms

TRACKING_TV = 0.05  # a regime "tracks" its closed form when its mean TV to it is at most this


def own_closed_form(regime: dict, lab: dict) -> Optional[dict]:
    """Which closed form a regime's end point should sit at, from its report entry and lab config:
    {kind: optimum | feedme | best_of_k | base, beta, alpha, k, rounds, reward}; None without one (keep_top > 1,
    adaptive β, β = α = 0, GRPO's group normalisation)."""
    get = lambda d, key, default=None: _dotted(d, key, default)  # noqa: E731
    group, name = regime.get("group"), regime.get("name", "")
    if regime.get("control_of"):
        return {"kind": "base"}
    if group == "selection":
        k = int(get(lab, "ratings.samples_per_prompt", 1))
        if name.startswith("bok") or regime.get("recipe") == "bok":
            return {"kind": "best_of_k", "k": k}
        if int(get(lab, "sft.keep_top", 1)) != 1 or get(lab, "sft.min_score") is not None:
            return None
        if get(lab, "sft.select", "top") == "random":
            return {"kind": "base"}
        return {"kind": "feedme", "k": k, "rounds": int(get(lab, "sft.rounds", 1))}
    beta, alpha = regime.get("kl_coef"), regime.get("ent_coef") or 0.0
    if beta is None or regime.get("adaptive_kl") or name.startswith("grpo") or (beta or 0) + alpha <= 0:
        return None
    return {"kind": "optimum", "beta": float(beta), "alpha": float(alpha), "reward": get(lab, "reward", "gold")}


def _dotted(d: dict, key: str, default=None):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def target_answers(form: PromptForms, spec: dict, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """(A,) the closed form's answer distribution on one prompt (normalised over the answers); `scores`: R over the
    outcomes to use for an optimum (a reward model's; default the gold rater's expected score)."""
    if spec["kind"] == "base":
        q = form.p0
    elif spec["kind"] == "best_of_k":
        q = best_of_k(form.p0, form.mu, spec["k"])
    elif spec["kind"] == "feedme":
        q = feedme_selection(form.p0, form.level_probs, spec["k"], spec["rounds"])
    else:
        q = optimum(form.p0, form.mean if scores is None else scores, spec["beta"], spec["alpha"])
    return form.answers(q)


def rm_outcome_scores(form: PromptForms, rm_prompt: dict) -> np.ndarray:
    """A reward model's scores over a prompt's outcomes (answers clean, then otherwise ended; "other" below all)."""
    s = np.concatenate([rm_prompt["clean"], rm_prompt["other"]]).astype(float)
    return np.append(s, s.min() - 10.0)


def tracking(forms: Sequence[PromptForms], spec: dict, answers_by_seed: dict, rm_by_seed: Optional[dict] = None) -> dict:
    """Mean TV of a regime's end-point answer distributions (per seed: {prompt id: probs}) to its closed form,
    across prompts then seeds: {tv (gold rater's closed form), tv_rm (the reward model's exact π*, reward=rm
    optimum regimes only), tracks (tv_own ≤ TRACKING_TV, own = rm for reward=rm)}."""
    by_id = {f.id: f for f in forms}
    tvs, tvs_rm = [], []
    for seed, answers in answers_by_seed.items():
        ids = [pid for pid in answers if pid in by_id]
        if not ids:
            continue
        tvs.append(np.mean([tv_to(answers[pid], target_answers(by_id[pid], spec)) for pid in ids]))
        rm = (rm_by_seed or {}).get(seed)
        if spec["kind"] == "optimum" and spec.get("reward") == "rm" and rm:
            rm_ids = {p["id"]: p for p in rm["prompts"]}
            scored = [pid for pid in ids if pid in rm_ids]  # the reward model scored this suite's answers
            if scored:
                tvs_rm.append(np.mean([tv_to(answers[pid], target_answers(by_id[pid], spec,
                                                                          rm_outcome_scores(by_id[pid], rm_ids[pid])))
                                       for pid in scored]))
    tv = float(np.mean(tvs)) if tvs else None
    tv_rm = float(np.mean(tvs_rm)) if tvs_rm else None
    own = tv_rm if spec.get("reward") == "rm" and spec["kind"] == "optimum" else tv
    return {"tv": tv, "tv_rm": tv_rm, "tv_own": own, "tracks": None if own is None else bool(own <= TRACKING_TV)}


def reference_for(spec: Optional[dict], fams: dict) -> Optional[list[dict]]:
    """The reference family a regime's closed form lies on (π*_β curve for KL-regularised, FeedME's for FeedME)."""
    if spec is None:
        return None
    if spec["kind"] == "optimum":
        return fams.get("optimum_beta") if spec["alpha"] == 0 else fams.get(f"optimum_beta_alpha{spec['alpha']:g}")
    return fams.get({"feedme": "feedme", "best_of_k": "best_of_k"}.get(spec["kind"], ""))


def thin(curve: Sequence[dict], at_kl: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5)) -> list[dict]:
    """The points of a traced family nearest to a few KL values (for a table)."""
    out = []
    for x in at_kl:
        i = int(np.argmin([abs(c["kl"] - x) for c in curve]))
        if curve[i] not in out and abs(curve[i]["kl"] - x) < 0.5 * x:
            out.append(curve[i])
    return out
