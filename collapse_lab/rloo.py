"""RLOO (Ahmadian et al. 2024, "Back to basics"): REINFORCE with a leave-one-out baseline, through TRL's
RLOOTrainer (plumbing: collapse_lab/trl_online.py). One step:

    1. rollout   k = rloo.samples_per_prompt completions of each of rollout_batch_size / k prompt draws
                 from the policy (the full vocabulary, temperature T)
    2. score     R_i = r(x, y_i) − penalty·[cut off] − β·Σ_t (log π − log π_ref)(y_i,t): the reward (gold
                 rater or the reward model on FeedME's ratings: reward=gold|rm) with the sequence's k1 KL
                 estimate INSIDE it (TRL: rewards − beta·kl)
    3. baseline  A_i = R_i − mean_{j≠i} R_j  (the other k − 1 samples of the same prompt)
    4. update    one gradient step on −A_i·ρ_i, ρ the (clipped) sequence importance ratio (1 on-policy)

Fixed point: with the KL in the reward the expected gradient is ∇(E[r] − β·KL(π‖π_ref)), so RLOO
converges to π*(y) ∝ π_ref(y)·e^{r(y)/β}, as KL-penalised PPO (REFERENCES.md; measured on the bandit:
tests/test_closed_forms.py, README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from collapse_lab.config import COUNT, KL_COEF, NONNEG, POSITIVE, TEMPERATURE
from collapse_lab.stage import BASE, ONLINE, REWARD, Stage, online_rating_budget
from collapse_lab.trl_online import train_online

STAGE = "rloo"


@dataclass
class RLOOSection:
    """`rloo.*`, named as PPO's where they mean the same."""

    steps: int = 100
    rollout_batch_size: int = 64  # completions per step
    samples_per_prompt: int = 4  # k: the leave-one-out group
    kl_coef: float = 0.1  # β: the sequence's k1 KL in the reward
    lr: float = 1e-4
    temperature: float = 1.0
    max_new_tokens: int = 8
    missing_eos_penalty: float = 1.0  # subtracted from the score of a completion cut off at max_new_tokens
    anneal_lr: bool = True
    max_grad_norm: float = 1.0  # 0: no clipping


def train_rloo(cfg: DictConfig, named: bool = True) -> Path:
    from trl import RLOOConfig, RLOOTrainer  # optional heavy dependency: loaded by the stages that train

    return train_online(cfg, named, STAGE, RLOOTrainer, RLOOConfig, normalize_advantages=False)


def ranges(section: str) -> dict:
    return {f"{section}.{k}": v for k, v in (("steps", COUNT), ("rollout_batch_size", COUNT), ("samples_per_prompt", COUNT),
                                              ("kl_coef", KL_COEF), ("lr", POSITIVE), ("temperature", TEMPERATURE),
                                              ("max_new_tokens", COUNT), ("missing_eos_penalty", NONNEG),
                                              ("max_grad_norm", NONNEG))}


# the registry's template (collapse_lab/registry.py names one entry per recipe)
REGIME = Stage(STAGE, train_rloo, section=STAGE, schema=RLOOSection, consumes=(BASE, REWARD), group=ONLINE,
               rating_budget=online_rating_budget(STAGE), kl_key="rloo.kl_coef", ranges=ranges(STAGE))
