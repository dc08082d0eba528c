"""Pure metric functions: arrays in, floats out. Natural logs throughout (nats).

Each function states its formula; tests compare them with hand-computed examples.
Conventions: 0·log 0 = 0; a distribution `p` is a 1-D array of non-negative numbers
summing to 1 (functions that accept unnormalised masses say so).
`METRICS` registers them by name (lm-eval-harness style) for reports that look them up.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats
from scipy.special import entr, rel_entr


def entropy(p: Sequence[float]) -> float:
    """H(p) = −Σ_i p_i log p_i  (nats; 0·log 0 = 0)."""
    return float(entr(np.asarray(p, dtype=np.float64)).sum())


def binary_entropy(t: float) -> float:
    """h(t) = −t log t − (1 − t) log(1 − t)  (nats), t ∈ [0, 1]."""
    return entropy([t, 1.0 - t])


def kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ q) = Σ_i p_i log(p_i / q_i)  (nats; terms with p_i = 0 are 0; +inf if q_i = 0 < p_i)."""
    return float(rel_entr(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)).sum())


def tv(p: Sequence[float], q: Sequence[float]) -> float:
    """TV(p, q) = ½ Σ_i |p_i − q_i|  ∈ [0, 1]."""
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def entropy_cross_term(p: Sequence[float], q: Sequence[float]) -> float:
    """C(p, q) = Σ_i (p_i − q_i)·log q_i  (nats), so that exactly H(p) − H(q) = −KL(p‖q) − C(p, q).

    The entropy lost beyond the distance travelled: C = 0 when q is uniform (then every method's
    ΔH is −KL), and C > 0 when p moves mass onto answers q already favoured. Terms with q_i = 0
    need p_i = 0 (else KL is infinite) and are 0.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    support = q > 0
    return float(((p[support] - q[support]) * np.log(q[support])).sum())


def entropy_upper_bound(p_answers: Sequence[float], vocab_size: int) -> float:
    """The seed post's bound on the full next-token entropy when only the answers' masses are known.

    B = −Σ_a p(a) log p(a) − (1 − M)·log((1 − M)/(V − |A|)),  M = Σ_a p(a) (unnormalised),
    i.e. the entropy if the missing mass 1 − M were spread uniformly over the other V − |A| tokens.
    Edge cases: M ≥ 1 (up to rounding) → the second term is 0 (0·log 0 = 0);
    V ≤ |A| with M < 1 → undefined, returns NaN (multi-token answers can outnumber a tiny vocabulary).
    """
    p = np.asarray(p_answers, dtype=np.float64)
    rest = max(1.0 - float(p.sum()), 0.0)
    head = entropy(p)
    if rest == 0.0:
        return head
    n_other = vocab_size - len(p)
    return head - rest * math.log(rest / n_other) if n_other > 0 else math.nan


def pinsker_tv_bound(kl_value: float) -> float:
    """Pinsker: TV(p, q) ≤ √(KL(p‖q)/2), capped at 1.

    The cap is 1, not 1 − 1/|A|: TV on |A| outcomes reaches 1 (two point masses on different
    answers). 1 − 1/d is where the Fannes–Audenaert bound saturates at log d; that cap belongs
    to `fannes_entropy_bound`, which applies it itself.
    """
    return min(math.sqrt(max(kl_value, 0.0) / 2.0), 1.0)


def fannes_entropy_bound(t: float, d: int) -> float:
    """Fannes–Audenaert: |H(p) − H(q)| ≤ T·log(d − 1) + h(T) for TV(p, q) ≤ T, d outcomes.

    T is capped at 1 − 1/d, where the right side reaches its maximum log d (the largest possible
    entropy difference on d outcomes); beyond it the bound stays log d. d = 1 → 0.
    Example (d = 101): T = √(0.1/2) → 1.56 nats; T = √(0.01/2) → 0.58 nats.
    """
    if d <= 1:
        return 0.0
    t = min(max(t, 0.0), 1.0 - 1.0 / d)
    return t * math.log(d - 1) + binary_entropy(t)


def mean_and_standard_error(x: Sequence[float]) -> tuple[float, float]:
    """(mean, SE) with SE = s/√n, s the sample standard deviation (ddof 1); SE = NaN if n < 2."""
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def sequence_entropy(logprobs: Sequence[float]) -> tuple[float, float]:
    """Monte Carlo sequence entropy H(Y|x) ≈ −(1/n) Σ_i log p(y_i|x), y_i ~ p(·|x); returns (estimate, SE).

    `logprobs` are log p(y_i|x) of whole samples (nats), at the temperature that sampled them.
    """
    return mean_and_standard_error(-np.asarray(logprobs, dtype=np.float64))


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
    """distinct-n = (number of unique n-grams) / (total n-grams), pooled over the samples (NaN if none)."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def has_repetition_loop(tokens: Sequence, min_len: int = 2, repeats: int = 3) -> bool:
    """True if some block of m ≥ min_len tokens occurs `repeats` times in a row:
    ∃ i, m ≥ min_len: y[i : i+m] = y[i+m : i+2m] = … = y[i+(r−1)m : i+rm]  (r = repeats).
    A token repeated 2·r times in a row (e.g. "!!!!!!") counts, as the block of its pairs.
    """
    y = list(tokens)
    for m in range(min_len, len(y) // repeats + 1):
        for i in range(len(y) - repeats * m + 1):
            if all(y[i + k * m : i + (k + 1) * m] == y[i : i + m] for k in range(1, repeats)):
                return True
    return False


def repetition_loop_rate(samples: Sequence[Sequence], min_len: int = 2, repeats: int = 3) -> float:
    """Share of samples with a repetition loop (see `has_repetition_loop`)."""
    return float(np.mean([has_repetition_loop(s, min_len, repeats) for s in samples]))


def ece(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: Σ_b (n_b/N)·|acc_b − conf_b| over equal-width confidence bins.

    Bin b = ((b−1)/B, b/B] (the first bin includes 0); acc_b = share correct, conf_b = mean confidence.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    acc = np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return float(sum(abs(acc[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins)))


def brier(probs: Sequence[Sequence[float]], correct_index: Sequence[int]) -> float:
    """Multi-class Brier score: (1/N) Σ_n Σ_a (q_n(a) − 1[a = c_n])², in [0, 2].

    `probs`: N normalised answer distributions (answer sets may differ in size); `correct_index`: c_n.
    """
    return float(np.mean([((np.asarray(q, dtype=np.float64) - np.eye(len(q))[c]) ** 2).sum()
                          for q, c in zip(probs, correct_index)]))


def interval(values: list[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """{mean, lo, hi, n, values}: mean ± t(1 − (1 − c)/2, n − 1)·s/√n across `values` (s the sample std,
    c the confidence; None and non-finite values dropped; lo = hi = None when n < 2). `bounds` (low, high): the
    quantity's valid range (a mass in [0, 1], a KL ≥ 0); the interval is clipped to it (`clipped` says so)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    mean = float(x.mean())
    lo = hi = None
    if len(x) > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
        lo, hi = mean - half, mean + half
    out = {"mean": mean, "lo": lo, "hi": hi, "n": int(len(x)), "values": [float(v) for v in x]}
    if bounds is not None and lo is not None:
        out["lo"], out["hi"] = max(lo, bounds[0]), min(hi, bounds[1])
        out["clipped"] = out["lo"] != lo or out["hi"] != hi
    return out


METRICS: dict[str, Callable] = {
    f.__name__: f
    for f in (entropy, binary_entropy, kl, tv, entropy_cross_term, entropy_upper_bound, pinsker_tv_bound, fannes_entropy_bound,
              sequence_entropy, distinct_n, repetition_loop_rate, ece, brier, interval)
}
