"""GRPO (Shao et al. 2024, DeepSeekMath) through TRL's GRPOTrainer (plumbing: collapse_lab/regimes/trl_online.py):

    1. rollout   a group of G = grpo.samples_per_prompt completions per prompt draw from the policy
    2. score     r_i = r(x, y_i) − penalty·[cut off] (gold rater or the reward model: reward=gold|rm);
                 NO KL in the reward
    3. advantage A_i = (r_i − mean_group r) / std_group r   (scale_rewards="group"), the same for every token
    4. update    per token: −A_i·ρ_t (clipped) + β·ρ_t·k3_t, k3 = π_ref/π − log(π_ref/π) − 1 (the KL in the
                 LOSS; ρ_t = π/π_old multiplies it: TRL 1.16's `use_bias_correction_kl`, on by default),
                 averaged per sequence then over sequences (loss_type="grpo": Shao et al.'s)

Fixed point (stated, and it is NOT π*): ρ·k3's expected gradient is ∇KL(π‖π_ref), so the stationary
condition is E_π[A·∇log π] = β·∇KL(π‖π_ref); for a tabular policy, π(a)·E_π[A | a] = β·π(a)·(log(π(a)/π_ref(a))
− KL), i.e. π(a) ∝ π_ref(a)·exp(E_π[A | y = a]/β): a tilt by the expected GROUP-NORMALISED advantage, ≈
(r(a) − E_π r)/σ_π(r) for large groups, an effective β·σ_π that shrinks as the policy concentrates (σ_π < 1:
further from π_ref than π* ∝ π_ref·e^{r/β}). Measured through this very trainer on the bandit
(collapse_lab/regimes/closed_forms.py, tests/test_closed_forms.py, docs/regimes.md): on that fixed point within TV 0.006,
0.15-0.16 from π*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from collapse_lab.core.config import COUNT, KL_COEF, NONNEG, POSITIVE, TEMPERATURE, one_of, ranged
from collapse_lab.stages.stage import BASE, ONLINE, REWARD, Stage, online_rating_budget
from collapse_lab.regimes.trl_online import check_online, train_online

STAGE = "grpo"


@dataclass
class GRPOSection:
    """`grpo.*`, named as PPO's where they mean the same."""

    steps: int = ranged(100, COUNT)
    rollout_batch_size: int = ranged(64, COUNT)  # completions per step
    samples_per_prompt: int = ranged(4, COUNT)  # G: the group
    kl_coef: float = ranged(0.1, KL_COEF)  # β: the k3 KL in the loss (TRL's beta; TRL's own default is 0)
    scale_rewards: str = one_of("group", "group", "batch", "none")  # group (Shao et al.) | batch | none (Dr. GRPO)
    loss_type: str = one_of("grpo", "grpo", "dapo", "dr_grpo")  # grpo (per-sequence token mean, Shao et al.) | dapo | dr_grpo (TRL's)
    lr: float = ranged(1e-4, POSITIVE)
    temperature: float = ranged(1.0, TEMPERATURE)
    max_new_tokens: int = ranged(8, COUNT)
    missing_eos_penalty: float = ranged(1.0, NONNEG)
    anneal_lr: bool = True
    max_grad_norm: float = ranged(1.0, NONNEG)


def train_grpo(cfg: DictConfig, named: bool = True) -> Path:
    from trl import GRPOConfig, GRPOTrainer  # optional heavy dependency: loaded by the stages that train

    g = cfg.grpo
    return train_online(cfg, named, REGIME, GRPOTrainer, GRPOConfig, scale_rewards=g.scale_rewards,
                        loss_type=g.loss_type)


# the regime's one declaration (collapse_lab/stages/stage.py): the registry names an entry per recipe of kind grpo
REGIME = Stage(STAGE, train_grpo, section=STAGE, schema=GRPOSection, consumes=(BASE, REWARD), group=ONLINE,
               rating_budget=online_rating_budget(STAGE), kl_key="grpo.kl_coef", check=check_online(STAGE))
