"""Curves, not points: every regime evaluated ALONG its training by the shared exact evaluator, and
regimes compared at the SAME distance from the base (docs/design.md, "Matched distance").

Along training (`Curve`). At `curve.points` optimiser steps (log-spaced by default: `schedule`; and the last) a
regime's policy is evaluated on the seed prompts of the evaluation suite with the evaluator's exact
answer distributions (collapse_lab/evaluator.answer_distribution) against the base's, computed once.
With q = p/M, the answer distribution normalised over the answer set A, and q0 the base's, a point is
a row of the run's metrics.jsonl holding the means over the prompts of

    frontier/kl                   KL(q ‖ q0) (nats)
    frontier/delta_norm_entropy   (H(q) − H(q0)) / log|A|
    frontier/cross_term           Σ_a (q − q0)(a)·log q0(a), so that ΔH = −KL − cross_term exactly
                                  (metrics.entropy_cross_term): on a uniform base it is 0 and entropy
                                  lost IS distance travelled; on a structured base it is not
    frontier/gold                 E_q[R], R the rater's MEAN score (noise, clipping, rounding integrated
                                  out: GoldRater.mean_score), each answer's EOS-ended and otherwise-ended
                                  mass scored as such
    frontier/valid_mass           M
    budget/samples_scored         the ratings the run had consumed by then

plus, for a run with a KL coefficient trained on the gold rater, the TV to its own π*
(`optimum/tv`, `optimum/tv_max`, `optimum/tv/<prompt>`: collapse_lab/evaluation/optimum.py).

Reference curves (`reference_curves`), exact functions of the base: best-of-k on the noiseless
score (collapse_lab/evaluation/best_of_k.py's closed form) for a ladder of k, and π*_β ∝ π0·e^{R/β}, the optimum of
KL-regularised reward maximisation, for a ladder of β.

The comparison at matched distance (`matched`, collapse_lab/evaluation/matched.py, torch-free): per seed, each curve's
d = Δ(H/log|A|) is interpolated (linearly in √KL) on a grid inside [x_lo, x_hi], where EVERY seed of both regimes
has measured points on both sides (never a chord from the base's (0, 0)); D_s = mean over the grid of d_A − d_B;
the call is on the t-interval of D_s across seeds (`equivalence_call`), or with prompts as a crossed random effect
too (`matched.crossed`). The closed-form families (best-of-k, FeedME's expected selection, π*_β, π*_{β,α}) are
traced from `Curve.base_forms()` by collapse_lab/evaluation/reference_curves.py (numpy only).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from collapse_lab.evaluation import metrics
from collapse_lab.evaluation.matched import KEYS
from collapse_lab.evaluation.best_of_k import answer_best_of_k
from collapse_lab.evaluation.evaluator import answer_distribution
from collapse_lab.evaluation.optimum import answer_optimum, answer_scores, log_optimum, optimum_tv
from collapse_lab.core.suites import load_suite


BEST_OF = (1, 2, 4, 8, 16, 64)
BETAS = (10.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05)
# curve.max_gap's probe: this many prompts, spread over the curve suite, evaluated exactly at every step (a tenth
# of a point's cost on the 30 held-out prompts); the KL of a collapse moves every number prompt together
PROBES = 3


def schedule(total_steps: int, points: int, spacing: str = "log") -> set[int]:
    """The optimiser steps evaluated along a run of `total_steps`, the last step always (points = 0: the last only):
    log (default): steps 1, 2, ... up to `points` values spaced evenly in log(step) from 1 to total_steps (dense where
    the KL is small: near the base d ≈ −c·√KL changes fastest, and the matched grid starts at every curve's FIRST
    measured point); linear: `points` evenly spaced steps."""
    if total_steps < 1:
        return set()
    if points <= 0:
        return {total_steps}
    if spacing == "log":
        return {int(round(s)) for s in np.geomspace(1, total_steps, points)} | {total_steps}
    if spacing != "linear":
        raise ValueError(f"curve.spacing: unknown '{spacing}'; valid choices: log, linear")
    return {max(1, round(total_steps * i / points)) for i in range(1, points + 1)} | {total_steps}


def _mean_score(q_clean: np.ndarray, q_other: np.ndarray, clean: np.ndarray, other: np.ndarray) -> float:
    """E[R] for the answer set's mass split into EOS-ended (scored `clean`) and otherwise-ended (`other`)."""
    return float((q_clean * clean).sum() + (q_other * other).sum())


def _eos_mass(dist) -> np.ndarray:
    """(A,) the EOS-ended part of each answer's mass (no EOS split known, e.g. a best-of-k transform: all of it)."""
    p = dist.probs
    return p if dist.eos_logprobs is None else np.minimum(np.exp(dist.eos_logprobs), p)


def _split(dist) -> tuple[np.ndarray, np.ndarray]:
    """(A,) EOS-ended and (A,) otherwise-ended mass of each answer, normalised together over A."""
    p, eos = dist.probs, _eos_mass(dist)
    return eos / p.sum(), (p - eos) / p.sum()


class Curve:
    """The base's exact answer distributions and the rater's mean scores on the seed prompts the world
    knows, computed once; `point(model, ...)` is one along-training evaluation (module docstring)."""

    def __init__(self, reference, tokenizer, world, suite: Optional[str] = None, prompts: Optional[list] = None):
        """suite: the prompts the curves are measured on; None: the world's `curve_suite` (seed by default;
        `heldout`: the world's held-out number prompts, never drawn by fine-tuning). prompts: suite Prompts
        given directly instead (e.g. the training templates with their answer sets)."""
        self.tokenizer, self.world = tokenizer, world
        if prompts is None:
            suite = suite or getattr(getattr(world, "cfg", None), "curve_suite", None) or "seed"
            prompts = load_suite(suite).prompts
        known = getattr(world, "by_text", {})
        self.prompts = [p for p in prompts if p.answers is not None and p.text in known]
        self.base = [answer_distribution(reference, tokenizer, p.text, p.answers, p.continue_chars) for p in self.prompts]
        self.scores = [answer_scores(world.rater, world.prompt(p.text), p.answers) for p in self.prompts]
        self.base_gold = [_mean_score(*_split(b), *s) for b, s in zip(self.base, self.scores)]
        # curve.max_gap's probe: PROBES prompts spread over the suite, and their √KL at the last point (the base: 0)
        n = len(self.prompts)
        self.probes = sorted({int(i) for i in np.linspace(0, n - 1, min(PROBES, n)).round()}) if n else []
        self.last_probe = 0.0

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def _probe_value(self, kls) -> float:
        """√(mean KL over the probe prompts), √nats, from per-prompt KLs in the suite's order."""
        return math.sqrt(max(float(np.mean([kls[i] for i in self.probes])), 0.0))

    @torch.no_grad()
    def moved(self, model, max_gap: Optional[float]) -> bool:
        """Whether the probe prompts' exact √KL to the base has moved more than `max_gap` since the last point
        (curve.max_gap; None: never). Evaluates the probe prompts only; consumes no random numbers."""
        if max_gap is None or not self.probes:
            return False
        was_training = model.training
        kls = {i: metrics.kl(answer_distribution(model, self.tokenizer, self.prompts[i].text, self.prompts[i].answers,
                                                 self.prompts[i].continue_chars).normalised, self.base[i].normalised)
               for i in self.probes}
        model.train(was_training)
        return abs(self._probe_value(kls) - self.last_probe) > max_gap

    def resume(self, row: Optional[dict]) -> None:
        """The probe's value at `row`, a resumed run's last point (its per-prompt KLs; None: the base's 0)."""
        self.last_probe = 0.0 if row is None else self._probe_value(
            {i: row[f"frontier/kl/{self.prompts[i].id}"] for i in self.probes})

    @torch.no_grad()
    def point(self, model, samples_scored: Optional[float] = None, beta: Optional[float] = None,
              alpha: float = 0.0) -> dict:
        """One row: the frontier/* means over the prompts (and optimum/* when beta is given: the TV to
        π* of the objective E[R] − β·KL + α·H). Consumes no random numbers: training goes on unchanged."""
        was_training = model.training
        dists = [answer_distribution(model, self.tokenizer, p.text, p.answers, p.continue_chars) for p in self.prompts]
        model.train(was_training)
        rows = [self.row(d, b, s) for d, b, s in zip(dists, self.base, self.scores)]
        self.last_probe = self._probe_value([r["frontier/kl"] for r in rows])
        out = {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
        for p, r in zip(self.prompts, rows):  # per prompt too: prompts as a random effect (matched.crossed)
            out[f"frontier/kl/{p.id}"] = r["frontier/kl"]
            out[f"frontier/delta_norm_entropy/{p.id}"] = r["frontier/delta_norm_entropy"]
        out["frontier/gold_gain"] = out["frontier/gold"] - float(np.mean(self.base_gold))
        if samples_scored is not None:
            out["budget/samples_scored"] = samples_scored
        if beta is not None and beta + alpha > 0:
            tvs = {p.id: optimum_tv(d.probs, answer_optimum(b, *s, beta, alpha))
                   for p, d, b, s in zip(self.prompts, dists, self.base, self.scores)}
            out.update({"optimum/tv": float(np.mean(list(tvs.values()))), "optimum/tv_max": max(tvs.values()),
                        **{f"optimum/tv/{k}": v for k, v in tvs.items()}})
        return out

    @staticmethod
    def row(dist, base, scores) -> dict:
        """One prompt's frontier numbers for `dist` against `base` (AnswerDistributions on one answer set)."""
        q, q0 = dist.normalised, base.normalised
        h, h0, log_a = metrics.entropy(q), metrics.entropy(q0), math.log(len(q))
        return {"frontier/kl": metrics.kl(q, q0), "frontier/delta_norm_entropy": (h - h0) / log_a,
                "frontier/norm_entropy": h / log_a, "frontier/cross_term": metrics.entropy_cross_term(q, q0),
                "frontier/gold": _mean_score(*_split(dist), *scores), "frontier/valid_mass": float(dist.probs.sum())}

    def _outcomes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per prompt: the base's mass on its 2|A| outcomes (each answer ended with EOS, then each answer
        ended otherwise) and the rater's NOISELESS score of each (best-of-k ranks by it: collapse_lab/evaluation/best_of_k.py)."""
        out = []
        for p, b in zip(self.prompts, self.base):
            prompt = self.world.prompt(p.text)
            eos = _eos_mass(b)
            out.append((np.concatenate([eos, b.probs - eos]),
                        np.array([self.world.rater.expected(prompt, a, e) for e in (True, False) for a in p.answers])))
        return out

    def best_of_k(self, k: int) -> list["_Dist"]:
        """Per prompt, the exact best-of-k answer distribution of the base (collapse_lab/evaluation/best_of_k.py's closed form
        over the 2|A| outcomes plus "other", the mass outside A, which the rater scores below every answer)."""
        return [_Dist(*np.split(answer_best_of_k(p0, noiseless, k)[0], 2)) for p0, noiseless in self._outcomes()]

    def optimum(self, beta: float) -> list["_Dist"]:
        """Per prompt, π*_β ∝ π0·e^{R/β} over the 2|A| outcomes, R the rater's mean score (normalised over A:
        collapse_lab/optimum.log_optimum, as answer_optimum with the EOS split kept)."""
        out = []
        for (p0, _), s in zip(self._outcomes(), self.scores):
            with np.errstate(divide="ignore"):
                out.append(_Dist(*np.split(np.exp(log_optimum(np.log(p0), np.concatenate(s), beta)), 2)))
        return out

    def reference_curves(self, best_of=BEST_OF, betas=BETAS) -> dict:
        """{"best_of_k": [{k, frontier/*}], "optimum_beta": [{beta, frontier/*}], "base": base_forms()}: the
        base's exact reference curves (k = 1 is the base itself; β → ∞ too), and what the report needs to trace
        every closed-form family itself (collapse_lab/evaluation/reference_curves.py, numpy only)."""
        curve = lambda dists: _means([self.row(d, b, s) for d, b, s in zip(dists, self.base, self.scores)],  # noqa: E731
                                     self.base_gold)
        return {"best_of_k": [{"k": k, **curve(self.best_of_k(k))} for k in best_of],
                "optimum_beta": [{"beta": beta, **curve(self.optimum(beta))} for beta in betas],
                "base": self.base_forms()}

    def base_forms(self) -> dict:
        """The closed forms' inputs per seed prompt: the base's exact EOS-ended and otherwise-ended mass of each
        answer, the rater's noiseless (mu_*) and expected (mean_*) score of each, and the rater's noise
        (reference_curves.forms_from_json reads it)."""
        prompts = []
        for p, b, (clean, other) in zip(self.prompts, self.base, self.scores):
            prompt, eos = self.world.prompt(p.text), _eos_mass(b)
            prompts.append({"id": p.id, "answers": list(p.answers), "eos_probs": eos.tolist(),
                            "other_end_probs": (b.probs - eos).tolist(),
                            "mu_clean": [self.world.rater.expected(prompt, a, True) for a in p.answers],
                            "mu_other": [self.world.rater.expected(prompt, a, False) for a in p.answers],
                            "mean_clean": np.asarray(clean).tolist(), "mean_other": np.asarray(other).tolist()})
        rater = self.world.rater.cfg
        return {"prompts": prompts, "rater": {"noise_std": float(getattr(rater, "noise_std", 0.0)),
                                              "integer_scores": bool(getattr(rater, "integer_scores", False))}}


class _Dist:
    """An answer distribution given as its EOS-ended and otherwise-ended parts (for `Curve.row`)."""

    def __init__(self, eos, other):
        self.probs = np.asarray(eos, dtype=np.float64) + np.asarray(other, dtype=np.float64)
        with np.errstate(divide="ignore"):
            self.eos_logprobs = np.log(np.asarray(eos, dtype=np.float64))
        self.normalised = self.probs / self.probs.sum()


def _means(rows: list[dict], base_gold: list[float]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
    out["frontier/gold_gain"] = out["frontier/gold"] - float(np.mean(base_gold))
    return out


def callbacks(curve: Optional[Curve], points: int, budget, offset: int = 0, spacing: str = "log",
              max_gap: Optional[float] = None) -> list:
    """[a transformers TrainerCallback] evaluating `curve` at `schedule(the trainer's max_steps, points)`, and at any
    other step where the probe prompts moved more than `max_gap` (curve.max_gap: Curve.moved; the row carries
    frontier/by_gap = 1), appending each point to the trainer's log history (the stage saves it as its
    metrics.jsonl), `step` = offset + the trainer's step (iterated FeedME: the steps of earlier rounds); `budget()`:
    the ratings consumed by then. [] without a curve (a world without the seed prompts, e.g. the bandit)."""
    if curve is None:
        return []
    from transformers import TrainerCallback  # optional heavy dependency: the Trainer-based stages load it

    class CurvePoints(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if not state.is_world_process_zero:
                return
            due = state.global_step in schedule(state.max_steps, points, spacing)
            if due or curve.moved(model, max_gap):
                state.log_history.append({"step": offset + state.global_step, **curve.point(model, budget()),
                                          **({} if due else {"frontier/by_gap": 1.0})})

    return [CurvePoints()]


