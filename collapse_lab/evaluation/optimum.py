"""The sequence-level closed form: what a regime's objective asks for, over whole answers.

For a prompt x, the base π0 and the rater's MEAN score R(x, y) (`GoldRater.mean_score`: the
rating noise, clipping and rounding integrated out), the objective over whole completions y

    max_π  E_π[R] − β·KL(π‖π0) + α·H(π)

has the optimum (Korbak et al. 2022; Rafailov et al. 2023 eq. 4; with α: the soft-RL optimum)

    π*(y|x) ∝ π0(y|x)^κ · exp(R(x, y)/τ),    κ = β/(α+β),  τ = α+β.

On the evaluator's answer set A an answer a is two kinds of completion: its tokens then EOS (the
rater's "ends cleanly") and its tokens then any other end token (a non-digit: well formed, in
range, not clean). So

    π*(a) ∝ π0(a, EOS)^κ · e^{R(a, clean)/τ} + π0(a, other end)^κ · e^{R(a, not clean)/τ}.

The second term lumps every continuation after a non-EOS end into one event with the score of
an answer that did not end cleanly: exact for α = 0 (the rater scores every such continuation
alike, a cut-off one aside); for α > 0 it leaves out the entropy of the continuation. The
comparison is over valid answers: π* and the policy are both normalised over A. β = α = 0 has
no unique optimum (any split of the mass among the best answers): `answer_optimum` returns None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf
from scipy.special import logsumexp

from collapse_lab.evaluation import metrics
from collapse_lab.core.checkpoint import read_manifest
from collapse_lab.world.world import make_world
from collapse_lab.core.config import read_record, rerun_repair


def log_optimum(log_p0: np.ndarray, scores: np.ndarray, beta: float, alpha: float = 0.0) -> Optional[np.ndarray]:
    """(N,) log π*(y) over an enumerated set of completions y (normalised over the set):
    κ·log π0(y) + R(y)/τ, minus its log-sum-exp. None when β = α = 0 (no unique optimum)."""
    if beta < 0 or alpha < 0:
        raise ValueError(f"beta and alpha must be >= 0, got {beta}, {alpha}")
    if beta + alpha == 0:
        return None
    tau = alpha + beta
    z = (beta / tau) * np.asarray(log_p0, dtype=np.float64) + np.asarray(scores, dtype=np.float64) / tau
    return z - logsumexp(z)


def answer_optimum(dist, clean_scores: np.ndarray, unclean_scores: np.ndarray, beta: float,
                   alpha: float = 0.0) -> Optional[np.ndarray]:
    """(A,) π*(a) normalised over the answer set, from the base's exact `AnswerDistribution`
    (its `logprobs` and `eos_logprobs`) and the mean scores of each answer ended cleanly (EOS) or
    not. None when β = α = 0. Without an EOS split (no EOS token), every end counts as clean."""
    if beta + alpha == 0:
        return None
    eos = dist.logprobs if dist.eos_logprobs is None else np.minimum(dist.eos_logprobs, dist.logprobs)
    with np.errstate(divide="ignore"):  # log 0 = -inf: an answer with no non-EOS end mass
        other = np.log(np.clip(np.exp(dist.logprobs) - np.exp(eos), 0.0, None))
    log_p0 = np.concatenate([eos, other])
    scores = np.concatenate([np.asarray(clean_scores, float), np.asarray(unclean_scores, float)])
    log_pi = log_optimum(log_p0, scores, beta, alpha)
    n = len(dist.answers)
    return np.exp(np.logaddexp(log_pi[:n], log_pi[n:]) - logsumexp(np.logaddexp(log_pi[:n], log_pi[n:])))


def answer_scores(rater, prompt, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(A,) mean scores of each answer ended cleanly, and (A,) of it followed by anything else."""
    clean = np.array([rater.mean_score(prompt, a, True) for a in answers])
    unclean = np.array([rater.mean_score(prompt, a, False) for a in answers])
    return clean, unclean


def prompt_optimum(world, prompt_text: str, answers: list[str], base, beta: float, alpha: float = 0.0) -> Optional[np.ndarray]:
    """π* on one prompt from the base's `AnswerDistribution` and the world's rater; None when the
    world does not know the prompt (its rater needs the prompt's range) or β = α = 0."""
    if prompt_text not in getattr(world, "by_text", {}):
        return None
    return answer_optimum(base, *answer_scores(world.rater, world.prompt(prompt_text), answers), beta, alpha)


def optimum_tv(policy_probs: np.ndarray, target: np.ndarray) -> float:
    """TV between the policy's answer distribution normalised over the answer set and π*."""
    p = np.asarray(policy_probs, dtype=np.float64)
    return metrics.tv(p / p.sum(), target)


def run_objective(model_path: str) -> Optional[dict]:
    """The objective a lab PPO run optimised, from its directory: {beta, alpha, reward, world
    config}; None for anything else (a base, FeedME, a hub model) or a run with β = α = 0.
    An adaptive β (klauto) is taken at its final value."""
    path = Path(model_path)
    manifest = read_manifest(path)
    if not manifest or manifest.get("stage") != "ppo" or not (path / "config.yaml").is_file():
        return None
    cfg = OmegaConf.create(read_record(path / "config.yaml", rerun_repair(path)))
    beta = float((manifest.get("final") or {}).get("objective/kl_coef", cfg.ppo.kl_coef))
    alpha = float(cfg.ppo.ent_coef)
    if beta + alpha == 0 or make_world(cfg.world).reward_table is not None:  # a bandit: its own exact checks
        return None
    return {"beta": beta, "alpha": alpha, "reward": cfg.reward, "world": cfg.world}


ANSWER_GROUPS = ("favourites", "extensions", "same first token", "same last token", "other")


def answer_groups(answers: list[str], favourites: set[int], tokenizer) -> list[str]:
    """Each answer's group, from the rater's favourites and the tokenizer (nothing tuned to one favourites set):

        favourites        the rater's favourite answers
        extensions        other answers whose text starts with a favourite's (' 7' → ' 70'..' 79'): their mass
                          is what a policy keeps AFTER a favourite's last token instead of ending there
        same first token  other answers that share a favourite's first token but do not extend it (' 45', ' 4')
        same last token   other answers that share a favourite's last token (' 67' and ' 97': '7')
        other             the rest

    Where a policy trained towards π* misses it, by group (benchmarks/optimum_residual.py)."""
    ids = {a: tokenizer.encode(a, add_special_tokens=False) for a in answers}
    fav = [a for a in answers if a.strip().isdigit() and int(a.strip()) in favourites]

    def group(a: str) -> str:
        if a in fav:
            return "favourites"
        if any(a.startswith(f) for f in fav):
            return "extensions"
        if any(ids[a][0] == ids[f][0] for f in fav):
            return "same first token"
        if any(ids[a][-1] == ids[f][-1] for f in fav):
            return "same last token"
        return "other"

    return [group(a) for a in answers]
