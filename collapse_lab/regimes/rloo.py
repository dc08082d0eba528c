"""RLOO (Ahmadian et al. 2024, "Back to basics"): REINFORCE with a leave-one-out baseline, through TRL's
RLOOTrainer (plumbing: collapse_lab/regimes/trl_online.py). One step:

    1. rollout   k = rloo.samples_per_prompt completions of each of rollout_batch_size / k prompt draws
                 from the policy (the full vocabulary, temperature T)
    2. score     R_i = r(x, y_i) − penalty·[cut off] − β·Σ_t (log π − log π_ref)(y_i,t): the reward (gold
                 rater or the reward model on FeedME's ratings: reward=gold|rm) with the sequence's k1 KL
                 estimate INSIDE it (TRL: rewards − beta·kl)
    3. baseline  A_i = R_i − mean_{j≠i} R_j  (the other k − 1 samples of the same prompt)
    4. update    one gradient step on −A_i·ρ_i, ρ the (clipped) sequence importance ratio (1 on-policy)

Fixed point: with the KL in the reward the expected gradient is ∇(E[r] − β·KL(π‖π_ref)), so RLOO
converges to π*(y) ∝ π_ref(y)·e^{r(y)/β}, as KL-penalised PPO (docs/references.md; measured on the bandit:
tests/test_closed_forms.py, docs/regimes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from collapse_lab.core.config import COUNT, KL_COEF, NONNEG, POSITIVE, TEMPERATURE, ranged
from collapse_lab.stages.stage import BASE, ONLINE, REWARD, Stage, online_rating_budget
from collapse_lab.regimes.trl_online import check_online, train_online

STAGE = "rloo"


@dataclass
class RLOOSection:
    """`rloo.*`, named as PPO's where they mean the same."""

    steps: int = ranged(100, COUNT)
    rollout_batch_size: int = ranged(64, COUNT)  # completions per step
    samples_per_prompt: int = ranged(4, COUNT)  # k: the leave-one-out group
    kl_coef: float = ranged(0.1, KL_COEF)  # β: the sequence's k1 KL in the reward
    lr: float = ranged(1e-4, POSITIVE)
    temperature: float = ranged(1.0, TEMPERATURE)
    max_new_tokens: int = ranged(8, COUNT)
    missing_eos_penalty: float = ranged(1.0, NONNEG)  # subtracted from the score of a completion cut off at max_new_tokens
    anneal_lr: bool = True
    max_grad_norm: float = ranged(1.0, NONNEG)  # 0: no clipping


def train_rloo(cfg: DictConfig, named: bool = True) -> Path:
    from trl import RLOOConfig, RLOOTrainer  # optional heavy dependency: loaded by the stages that train

    return train_online(cfg, named, REGIME, RLOOTrainer, RLOOConfig, normalize_advantages=False)


# the regime's one declaration (collapse_lab/stages/stage.py): the registry names an entry per recipe of kind rloo
REGIME = Stage(STAGE, train_rloo, section=STAGE, schema=RLOOSection, consumes=(BASE, REWARD), group=ONLINE,
               rating_budget=online_rating_budget(STAGE), kl_key="rloo.kl_coef", check=check_online(STAGE))
