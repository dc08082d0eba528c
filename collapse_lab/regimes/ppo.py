"""Classic RLHF PPO (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N+
implementation details of RLHF with PPO"), one step = the five numbered steps of `train_ppo`:

    1. rollout   sample completions from the policy (temperature T, the FULL vocabulary, EOS
                 allowed everywhere: the sampled distribution is the one the update optimises)
    2. score     reward at the last token: gold rater or reward model; −penalty if cut off;
                 centred by the base's mean score (the first rollout's): the optimum is
                 unchanged, and the zero-initialised value head starts near the returns
    3. KL        per-token reward −β·(log π − log π_ref) − α·log π, π_ref the frozen base: the
                 k1 estimators of −β·KL and +α·H, so the sequence-level optimum is
                 π*(y) ∝ π_ref(y)^(β/(α+β))·e^{r(y)/(α+β)} (collapse_lab/evaluation/optimum.py). By default
                 (`ppo.kl_estimator=blend`) k1 only at the prompt's state; each later state's KL is
                 taken exactly over the vocabulary: the next states' KL in the reward and its direct
                 gradient a loss term (`kl_rewards`; the same gradient in expectation)
    4. GAE       values V(s_t), δ_t = r_t + γV_{t+1} − V_t,
                 A_t = Σ_l (γλ)^l δ_{t+l}, returns = A + V, advantages whitened
                 (λ = 1: A_t = return − V(s_t), unbiased whatever V is)
    5. update    K epochs of minibatches: clipped policy loss, clipped value loss (and, with
                 `ppo.entropy_bonus=loss`, CleanRL's −α·H(π(·|s)) term instead of step 3's)

Recipes: β = `ppo.kl_coef` (`kl0`, `kl0.1`, ...; `klauto` adapts it), α = `ppo.ent_coef`.
Along training (`curve.points` evaluations, collapse_lab/evaluation/frontier.py) each metrics row gains the policy's
frontier point on the seed prompts (KL to the base, entropy change, gold reward, ratings so far) and, with
`reward=gold`, `optimum/tv`: the TV between its exact answer distribution and the closed-form π* of its
own objective.
Values (`ppo.value_model`): `head` (default) and `shared` put a scalar head on the policy's last
hidden state (on the detached state, or trained with the trunk), read off generation at rollout
time, which saves a second model's forward and backward passes; `separate` is the base with a
fresh scalar head (AutoModelForTokenClassification), not the reward model: the N+ details' choice.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import AutoModelForTokenClassification, get_scheduler

from collapse_lab.core import tracking
from collapse_lab.world.bandit import kl_divergence, next_token_probs, optimum, reward_vector, total_variation
from collapse_lab.core.checkpoint import publish, read_manifest, write_manifest
from collapse_lab.core.console import note, progress_bars, quiet_logger
from collapse_lab.core.config import COUNT, KL_COEF, NONNEG, POSITIVE, SHARE, TEMPERATURE, ConfigError, one_of, ranged, run_dir
from collapse_lab.core.distributed import exact_div, world_size
from collapse_lab.models.models import DTYPES, add_lora, load_pretrained, mixed_precision
from collapse_lab.evaluation.evaluator import answer_distribution
from collapse_lab.evaluation.frontier import Curve, schedule
from collapse_lab.evaluation.optimum import answer_optimum, optimum_tv
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.stages.rewards import make_reward
from collapse_lab.stages.stage import BASE, ONLINE, REWARD, Run, Stage, online_rating_budget, ratings_budget, stage_function
from collapse_lab.models.rollout import (Rollout, by_prompt_length, entropy_from_logits, generate_by_length, length_chunks,
                                  packed_response_logits, packs, position_ids, response_logits, select, token_logprobs,
                                  width)
from collapse_lab.world.world import make_world

STAGE = "ppo"


@dataclass
class PPOSection:
    """Classic RLHF PPO (Ziegler et al. 2019; Huang et al. 2024); names as in the N+ details."""

    # The defaults spend a 10-minute CPU run on RATINGS: how close PPO gets to its objective's optimum is set
    # by how many noisy ratings it has seen (the rater's noise leaves each answer's mean score known to
    # σ/√n), so one epoch over large batches of many completions per prompt (cheap: each prompt's prefix is
    # computed once) beats more epochs over fewer samples (docs/ppo.md, the information limit); 1000 steps:
    # about the ratings the hardest row of docs/ppo.md's table needs, within a 10-minute run of the tiny base on
    # 2 CPU cores (docs/ppo.md, wall time)
    steps: int = ranged(1000, COUNT)
    rollout_batch_size: int = ranged(256, COUNT)  # completions per step (over all processes)
    # completions sampled per prompt: a prompt's prefix is computed once for all of them (generation,
    # reference and update forwards); the prompts still come from the world's training distribution
    samples_per_prompt: int = ranged(8, COUNT)
    minibatch_size: int = ranged(64, COUNT)
    micro_batch_size: int = ranged(32, COUNT)  # sequences per forward/backward (per process); gradients accumulate to a minibatch
    # completions sampled together (per process), in chunks of similar prompt length. On the packed path
    # (rollout.packs) a chunk pays no padding and an ended completion no compute, so fewer, larger forwards
    # are faster (docs/ppo.md, speed); on the cache path each row pays its chunk's longest prompt
    generation_batch_size: int = ranged(256, COUNT)
    ppo_epochs: int = ranged(1, COUNT)
    lr: float = ranged(1e-4, POSITIVE)  # the policy's, for the tiny base (annealed to 0); real models want ~1e-6..1e-5
    # the value model's or head's (None: lr). Adam's step is ~lr whatever vf_coef, and a fresh
    # scalar head at 5e-5 needs ~100 steps to reach returns of ~6: hence its own, larger rate
    value_lr: Optional[float] = ranged(1e-3, POSITIVE)
    # AdamW's epsilon for the POLICY's parameters (CleanRL's 1e-5). Far above the gradients' RMS it turns the policy's
    # step into momentum SGD with rate lr/eps: the optimiser-geometry probe of docs/ppo.md (its path, not its end point)
    adam_eps: float = ranged(1e-5, POSITIVE)
    kl_coef: float = ranged(0.1, KL_COEF)  # beta: per-token -beta * (log pi - log pi_base) in the reward
    adaptive_kl: bool = False
    kl_target: float = ranged(6.0, POSITIVE)
    # samples over which β may move by a factor ~e^0.2. None: a tenth of the run's samples
    # (steps·rollout_batch_size/10), so β can move up to e^{±2} over a run and at most 2/steps per
    # step in log — slow next to the policy's own response, which a fixed horizon is not for every
    # batch size and length (Ziegler et al.'s 10000 was for runs of millions of episodes)
    kl_horizon: Optional[int] = ranged(None, COUNT)
    ent_coef: float = ranged(0.0, NONNEG)  # alpha: entropy bonus
    # reward: −α·log π(y_t) per token in the reward (the k1 estimator of α·H over whole completions:
    # the sequence-level optimum is π_ref^(β/(α+β))·e^{r/(α+β)}); loss: CleanRL's −α·H(π(·|s_t)) loss
    # term over the full vocabulary (no credit for later tokens' entropy: not that optimum)
    entropy_bonus: str = one_of("reward", "reward", "loss")
    # the KL penalty's estimator. k1: −β·(log π(y_t) − log π_ref(y_t)) of each sampled token in the reward.
    # analytic: the exact KL(π(·|s)‖π_ref(·|s)) over the vocabulary at each visited state s_t, with the
    # exact gradient of E[Σ_t KL_t]: the later states' KL in the reward (the score-function part) and
    # β·KL_t(θ) as a loss term (the direct part, scaled like the advantages). Same objective and optimum,
    # every token of a visited state pulled back each time (docs/ppo.md).
    # blend: k1 at the prompt's state, c·k1 + (1 − c)·analytic at every later state, c = kl_blend (ppo.k1_shares).
    # Each mix is an unbiased gradient of the same β·KL. k1 keeps a control variate analytic lacks (at π*,
    # r − β·log π/π_ref = β·log Z for every answer: no gradient noise left, and Adam needs none to settle);
    # the exact term restores a token no sample draws at a later state (k1 cannot: a path PPO closed stays closed)
    # (docs/ppo.md, `ppo.kl_estimator=blend`). Except k1, each keeps the reference's and π_old's next-token
    # distributions at every response state of the rollout (B·Tr·V floats each): with a large vocabulary and
    # long answers, use k1
    kl_estimator: str = one_of("blend", "k1", "analytic", "blend")
    kl_blend: float = ranged(0.0, SHARE)  # c, k1's share at the later states under kl_estimator=blend (1: k1, 0: analytic)
    # c: + c·KL(π_old(·|s_t) ‖ π_θ(·|s_t)) over the whole vocabulary at each visited state in the loss (on the
    # whitened advantages' scale), beside the ratio clip: a trust region that also holds the tokens NOT
    # sampled at s_t (the ratio clip binds only on sampled ones) and a likely token whose ratio cannot reach
    # 1 + clip_range. Its gradient is 0 at π_θ = π_old: the objective's optimum is unchanged
    # (Schulman et al. 2017's KL-penalty PPO, exact over the vocabulary; 0: off)
    trust_region_coef: float = ranged(0.0, NONNEG)
    center_scores: bool = True  # subtract the base's mean score (the first rollout's): same optimum
    gamma: float = ranged(1.0, SHARE)
    # GAE λ: 1 makes A_t = return − V(s_t), an unbiased advantage whatever the value head says; λ < 1
    # borrows V, and an untrained V (0 at first) then credits the first token of a short answer more
    # than that of a long one with the same score (docs/ppo.md, the sequence bandit)
    lam: float = ranged(1.0, SHARE)
    clip_range: float = ranged(0.2, POSITIVE)
    clip_range_value: float = ranged(0.2, POSITIVE)
    vf_coef: float = ranged(0.1, NONNEG)
    # head (default): a scalar head on the policy's DETACHED last hidden state, so the policy's
    # update is the clipped PPO objective alone; shared: the same head with the value loss also
    # training the trunk (TRL's old ValueHead); separate: its own trunk + head (the N+ details).
    # head/shared read the rollout's values off generation: no value forward, no second model
    # (benchmarks/bench_ppo.py).
    value_model: str = one_of("head", "separate", "shared", "head")
    whiten_advantages: bool = True
    temperature: float = ranged(1.0, TEMPERATURE)
    max_new_tokens: int = ranged(8, COUNT)
    missing_eos_penalty: float = ranged(1.0, NONNEG)  # subtracted from the score of a completion cut off at max_new_tokens
    anneal_lr: bool = True  # linear decay to 0 over the run (CleanRL's default)
    max_grad_norm: float = ranged(1.0, NONNEG)  # 0 = no clipping
    save_every: int = ranged(50, COUNT)  # steps between resumable checkpoints
    # along-training evaluations of this run (None: curve.points, which is per Trainer run: a FeedME round is one).
    # A PPO run is many FeedME rounds long, and its held-out KL can jump within a few steps
    curve_points: Optional[int] = ranged(None, COUNT)
    log_every: int = ranged(1, COUNT)


def ppo_dir(cfg: DictConfig, named: bool = True) -> Path:
    kl = "klauto" if cfg.ppo.adaptive_kl else f"kl{cfg.ppo.kl_coef:g}"
    ent = f"-ent{cfg.ppo.ent_coef:g}" if cfg.ppo.ent_coef else ""
    return run_dir(cfg, STAGE, REGIME.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-{kl}{ent}-s{cfg.seed}", named)


@dataclass
class Batches:
    """Batch arithmetic in ONE place: global sizes from the recipe, per-process sizes derived."""

    rollout: int  # sequences per PPO step, over all processes
    minibatch: int  # sequences per gradient step, over all processes
    rollout_per_device: int
    minibatch_per_device: int
    minibatches: int  # gradient steps per epoch
    prompts_per_device: int  # distinct prompts per step and process (each sampled samples_per_prompt times)


def batch_sizes(p: DictConfig, world_size: int) -> Batches:
    return Batches(
        rollout=p.rollout_batch_size,
        minibatch=p.minibatch_size,
        rollout_per_device=exact_div(p.rollout_batch_size, world_size, "ppo.rollout_batch_size over processes"),
        minibatch_per_device=exact_div(p.minibatch_size, world_size, "ppo.minibatch_size over processes"),
        minibatches=exact_div(p.rollout_batch_size, p.minibatch_size, "ppo.rollout_batch_size over ppo.minibatch_size"),
        prompts_per_device=exact_div(exact_div(p.rollout_batch_size, world_size, "ppo.rollout_batch_size over processes"),
                                     p.samples_per_prompt, "ppo.rollout_batch_size per process over ppo.samples_per_prompt"),
    )


class KLController:
    """β, fixed or adaptive (Ziegler et al. 2019): e = clip(KL/KL_target − 1, ±0.2),
    β ← β·exp(e·n/horizon), n = samples in the batch; horizon (samples) defaults to
    steps·rollout_batch_size/10. Ziegler et al.'s β·(1 + e·n/horizon) to first order, but never ≤ 0:
    with the default horizon a run of ≤ 2 steps multiplied β by 1 − 0.2·10/steps ≤ 0."""

    def __init__(self, p: DictConfig):
        self.value, self.adaptive, self.target = float(p.kl_coef), p.adaptive_kl, p.kl_target
        self.horizon = p.kl_horizon or p.steps * p.rollout_batch_size / 10

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            e = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= math.exp(e * n / self.horizon)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class KLPenalty:
    """β·KL(π‖π_ref), the penalty of PPO's objective, by the estimator `ppo.kl_estimator`, in its two parts:

        reward   per-token rewards −β·(c_t·ℓ_t + (1 − c_{t+1})·KL_{t+1})   (kl_rewards; ℓ_t the sampled token's
                 log π − log π_ref, KL_t = KL(π(·|s_t) ‖ π_ref(·|s_t)) over the vocabulary)
        loss     the direct part β·(1/std A)·Σ_t (1 − c_t)·KL_t(θ) / n_tokens   (none for k1)

    with the k1 shares c_t of k1_shares: k1 c_t = 1 (the sampled token's log-ratio alone, no (B, Tr, V)
    tensors), analytic c_t = 0, blend c_0 = 1 and c_t = kl_blend after it. Every choice is an unbiased gradient
    of the same β·E[Σ_t KL_t] (tests/test_ppo.py enumerates it; the trainer-level test drops the loss part)."""

    def __init__(self, estimator: str, blend: float):
        self.estimator, self.blend = estimator, blend
        self.exact = estimator != "k1"  # some state's KL taken exactly: needs the (B, Tr, V) log-probs

    def shares(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return k1_shares(self.estimator, self.blend, length).to(like)

    def reward(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float,
               old_full: Optional[torch.Tensor] = None, ref_full: Optional[torch.Tensor] = None):
        """((B, Tr) the penalty's per-token rewards, (B, Tr) the KL it measures at each state, nats): k1 the
        sampled tokens' log-ratios; otherwise the exact KL_t from π_old's and π_ref's (B, Tr, V) log-probs."""
        if not self.exact:
            kl = (logprobs - ref_logprobs) * mask
            return -beta * kl, kl
        kl = state_kl(old_full, ref_full) * mask  # a_t is credited with the LATER states' KL only
        return kl_rewards(logprobs - ref_logprobs, kl, mask, self.shares(kl.shape[1], kl), beta), kl

    def loss(self, full: Optional[torch.Tensor], ref_full: Optional[torch.Tensor], mask: torch.Tensor, beta: float,
             adv_scale: torch.Tensor, n_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """The direct part of ∇(β·E[Σ_t KL_t]) over (b, w) visited states, on the advantages' scale (a scalar
        with its gradient; None for k1), from π_θ's and π_ref's (b, w, V) log-probs."""
        if not self.exact:
            return None
        kl_now = state_kl(full, ref_full)
        exact = (1 - self.shares(kl_now.shape[1], kl_now)) * mask  # (b, w) the exact share 1 − c_t
        return beta * adv_scale * (kl_now * exact).sum() / n_tokens


class Progress:
    """Counters a resumed run continues from, checkpointed with the models and optimiser (state.json).
    (Prompt and rater randomness is seeded per (seed, process, step): nothing to store.)"""

    def __init__(self):
        self.step, self.samples_scored, self.tokens_trained, self.wall_time_s = 0, 0, 0, 0.0
        self.score_baseline = None  # the base's mean score (first rollout), subtracted from every score

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − mean)/std over real tokens, and the scale 1/std it applied."""
    mean = masked_mean(x, mask)
    scale = torch.rsqrt(masked_mean((x - mean) ** 2, mask) + 1e-8)
    return (x - mean) * scale * mask, scale


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(B, T) advantages and returns; values past the last real token are 0 (terminal)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    values = values * mask
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * mask[:, t + 1] if t + 1 < rewards.shape[1] else delta
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def value_predictions(value_model, rollout: Rollout) -> torch.Tensor:
    """(B, Tr) V(s_t) of a separate value model: its head's output where response token t is predicted."""
    out = value_model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                      position_ids=position_ids(rollout.attention_mask), use_cache=False)
    return out.logits[:, rollout.query_len - 1:-1, 0].float()


def value_model(policy, base: str, cfg: DictConfig, pad_token_id: int) -> torch.nn.Module:
    """`separate`: the base + a scalar head (own LoRA under peft); `shared`/`head`: a scalar head
    for the policy's last hidden state. Heads start at 0: V = 0, no initial value-loss shock."""
    if cfg.ppo.value_model != "separate":
        head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=DTYPES[cfg.model.dtype])
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        return head
    value = AutoModelForTokenClassification.from_pretrained(base, num_labels=1, dtype=DTYPES[cfg.model.dtype])
    value.config.pad_token_id = pad_token_id
    torch.nn.init.zeros_(_head(value).weight)
    return add_lora(value, cfg.peft, task_type="TOKEN_CLS") if cfg.peft.enabled else value


@stage_function(STAGE, ppo_dir, "{steps} steps")
def train_ppo(cfg: DictConfig, run: Run) -> None:
    """PPO on this config (or find it finished, or resume it): `train_ppo(cfg, named=True)` returns the run's
    directory (stage.stage_function: the shared bookkeeping; the run directory is written only after every
    input is checked, and an interrupted run resumes from its last checkpoint). One step = the five numbered
    steps of the module docstring."""
    p = cfg.ppo
    s = setup(cfg, run.out)
    run.start(resume=True, base_path=s.base)  # after every input is checked: rejected input leaves no run directory
    bar = tqdm(total=p.steps, initial=s.progress.step, desc=f"ppo {run.out.name}",
               disable=not (s.accelerator.is_main_process and progress_bars()))
    started = time.time() - s.progress.wall_time_s
    while s.progress.step < p.steps:
        step_start = time.time()
        prompts = draw_prompts(cfg, s)  # and the rater's noise, seeded per (seed, process, step)
        with torch.no_grad(), s.accelerator.autocast():  # the reference is not prepared: autocast here too
            # 1. rollout: completions with their log-probs under the sampling distribution (π at T, from the
            #    generation's logits), the reference's log-probs, values (rows batched by prompt length)
            b = rollout(cfg, s, prompts)
            # 2. score: the reward at the last token; completions cut off at max_new_tokens are penalised;
            #    centred by the base's mean score (a constant: every completion's objective moves alike)
            b.scores = score(cfg, s, prompts, b)
            # 3. the KL penalty's reward part per token (KLPenalty), the entropy bonus (entropy_bonus=reward),
            #    the centred score at the last token
            b.rewards, b.kl = kl_into_reward(cfg, s, b)
            # 4. GAE over response tokens, then whitened advantages. Whitening scales the reward's gradient by
            #    1/std(A), every term of the reward alike; a loss-term entropy bonus gets the same scale, but
            #    1/std(A) is a batch statistic, so its balance with the reward drifts (tested)
            b.advantages, b.returns = gae(b.rewards, b.values, b.mask, p.gamma, p.lam)
            if p.whiten_advantages:
                b.advantages, b.adv_scale = masked_whiten(b.advantages, b.mask)
        # 5. K epochs of minibatch updates: the clipped policy and value losses (ppo_loss), the KL penalty's
        #    direct part, the trust region
        stats = update(cfg, s, b, run.out)
        row = end_step(cfg, s, reduce_row(s.accelerator, metrics_row(b, stats, s.kl_ctl.value)), b, run.out,
                       started, step_start)
        if s.accelerator.is_main_process:
            bar.set_postfix({"kl": f"{row['objective/kl']:.3f}", "score": f"{row['objective/scores']:.2f}"})
        bar.update(1)
    bar.close()
    finish(cfg, run, s)


# ------------------------------------------------------------------------------- one step


@dataclass
class Setup:
    """What a PPO run holds across its steps (`setup`)."""

    accelerator: Accelerator
    policy: torch.nn.Module  # prepared (a DDP wrapper under a launcher)
    ref: Optional[torch.nn.Module]  # the frozen base; None under LoRA: the policy with its adapter disabled
    value: torch.nn.Module  # a scalar head (head, shared) or a model with one (separate)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list
    tokenizer: Any
    forward: Callable  # every forward of a rollout's responses (packed or cached: the same results)
    world: Any
    reward: Any
    kl: KLPenalty
    kl_ctl: KLController
    progress: Progress
    batches: Batches
    base: str
    max_new_tokens: int
    missing_eos_penalty: float
    on_policy: bool  # values read off the policy's hidden states (value_model head or shared)
    trust_region: bool
    exact_metrics: Optional[Callable]  # a world with a reward table (the bandit): policy, β -> its exact metrics
    curve: Optional[Curve]  # along-training evaluation on the seed prompts (main process)
    curve_steps: Any


@dataclass
class Batch:
    """One step's rollout and what steps 2-4 add to it: (B, Tr) per response token unless noted."""

    rollout: Rollout
    mask: torch.Tensor  # 1 up to and including EOS
    logprobs: torch.Tensor  # π_old at temperature T, nats
    entropy: torch.Tensor  # scalar: the sampled states' mean next-token entropy
    ref_logprobs: torch.Tensor
    ref_full: Optional[torch.Tensor]  # (B, Tr, V) the reference's log-probs (KLPenalty.exact only)
    values: torch.Tensor
    old_full: Optional[torch.Tensor] = None  # (B, Tr, V) π_old's log-probs (exact KL or the trust region)
    scores: Optional[torch.Tensor] = None  # (B,) after the missing-EOS penalty, before centring
    kl: Optional[torch.Tensor] = None  # the KL measured at each state (KLPenalty.reward)
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    adv_scale: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))  # 1/std(A) under whitening


def setup(cfg: DictConfig, out: Path) -> Setup:
    """The accelerator, models, optimiser, world, reward, β and counters (restored from the last checkpoint
    of an interrupted run), and the along-training metrics; every input checked before the run directory."""
    p = cfg.ppo
    # A trainer earlier in this process (the ablation's reward model and FeedME: TRL defaults to bf16) leaves
    # its mixed precision in accelerate's process-wide state, which a new Accelerator would inherit: PPO in
    # an ablation then ran under bf16 autocast and the same run alone in fp32, in ONE cached run directory.
    # Reset it (the distributed state stays) so that `precision` alone decides.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg))
    batches = batch_sizes(p, accelerator.num_processes)
    base = resolve_base(cfg)  # every process: pretraining (if needed) is itself multi-process
    set_seed(cfg.seed, device_specific=True)

    # models: the policy (LoRA: reference = the same weights, adapter disabled), a frozen
    # reference copy for full fine-tuning, and the value model or head
    policy, tokenizer = load_pretrained(base, cfg.model.dtype, cfg.peft)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    ref = None if cfg.peft.enabled else load_pretrained(base, cfg.model.dtype)[0].requires_grad_(False).eval()
    value = value_model(policy, base, cfg, tokenizer.pad_token_id)
    forward = packed_response_logits if packs(policy) else response_logits
    policy.eval(), value.eval()  # dropout off: log-probs must match between rollout and update
    groups = [{"params": [q for q in m.parameters() if q.requires_grad], "lr": lr, "eps": eps}
              for m, lr, eps in ((policy, p.lr, p.adam_eps), (value, p.value_lr or p.lr, 1e-5))]
    params = [q for g in groups for q in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    updates = p.steps * p.ppo_epochs * batches.minibatches
    scheduler = get_scheduler("linear" if p.anneal_lr else "constant", optimizer, 0, updates)
    policy, value, optimizer, scheduler = accelerator.prepare(policy, value, optimizer, scheduler)
    if ref is not None:
        ref = ref.to(accelerator.device)

    world = make_world(cfg.world)
    max_new_tokens, missing_eos_penalty = world.episode(p.max_new_tokens, p.missing_eos_penalty)
    reward = make_reward(cfg, world, accelerator.device)
    kl_ctl, progress = KLController(p), Progress()
    # β and the counters go into every save_state directory as JSON (_checkpoint, _load_checkpoint)
    accelerator.register_save_state_pre_hook(lambda _m, _w, d: _save_json_state(d, accelerator, kl_ctl, progress))
    resume = _last_checkpoint(out)
    if resume:
        _load_checkpoint(accelerator, resume, kl_ctl, progress)
        accelerator.print(f"resuming from {resume} (step {progress.step})")
    if accelerator.is_main_process:
        _drop_metrics_after(out / "metrics.jsonl", progress.step)
    reference = ref if ref is not None else accelerator.unwrap_model(policy)
    points = cfg.curve.points if p.curve_points is None else p.curve_points
    exact_metrics = _bandit_setup(cfg, tokenizer, reference) if world.reward_table is not None else None
    curve = None
    if exact_metrics is None and accelerator.is_main_process:
        with reference.disable_adapter() if ref is None else nullcontext():
            curve = Curve(reference, tokenizer, world) or None
        if curve is not None and resume:  # curve.max_gap measures from the last point before the resume
            curve.resume(_last_curve_row(out / "metrics.jsonl"))
    return Setup(accelerator, policy, ref, value, optimizer, scheduler, params, tokenizer, forward, world, reward,
                 KLPenalty(p.kl_estimator, p.kl_blend), kl_ctl, progress, batches, base, max_new_tokens,
                 missing_eos_penalty, on_policy=p.value_model != "separate", trust_region=p.trust_region_coef > 0,
                 exact_metrics=exact_metrics, curve=curve, curve_steps=schedule(p.steps, points, cfg.curve.spacing))


def _last_curve_row(path: Path) -> Optional[dict]:
    """The last along-training point written to a run's metrics.jsonl (None: none yet)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return next((r for r in reversed(rows) if "frontier/kl" in r), None)


def draw_prompts(cfg: DictConfig, s: Setup) -> list:
    """This step's prompts, each repeated samples_per_prompt times (adjacent: one prefill), and the rater's
    noise reseeded: both a function of (seed, process, step), so a resumed run draws what it would have."""
    seed_here = f"{cfg.seed}/{s.accelerator.process_index}/{s.progress.step}"
    prompt_rng = random.Random(f"ppo-prompts/{seed_here}")
    prompts = [q for q in (s.world.train_prompt(prompt_rng) for _ in range(s.batches.prompts_per_device))
               for _ in range(cfg.ppo.samples_per_prompt)]
    s.reward.reseed(seed_here)
    return prompts


def rollout(cfg: DictConfig, s: Setup, prompts: list) -> Batch:
    """1. Sample completions from the policy (temperature T, the full vocabulary), with the reference's
    log-probs (and whole next-token distributions for an exact KL) and the values V(s_t)."""
    p, chunk = cfg.ppo, cfg.ppo.micro_batch_size
    unwrapped = s.accelerator.unwrap_model(s.policy)
    r = generate_by_length(unwrapped, s.tokenizer, [q.text for q in prompts], s.max_new_tokens, p.temperature,
                           hidden=s.on_policy, chunk=p.generation_batch_size)
    mask = r.response_mask.float()  # (B, Tr) 1 up to and including EOS
    entropy = masked_mean(r.entropy, mask)
    ref_model, ref_full = s.policy if s.ref is None else s.ref, None
    with unwrapped.disable_adapter() if s.ref is None else nullcontext():
        if s.kl.exact:  # (B, Tr, V): the reference's whole next-token distribution at each state
            ref_full = by_prompt_length(r, lambda x: s.forward(ref_model, x, p.temperature).log_softmax(-1), chunk)
            ref_logprobs = ref_full.gather(2, r.responses.unsqueeze(-1)).squeeze(-1)
        else:
            ref_logprobs = by_prompt_length(r, lambda x: token_logprobs(s.forward(ref_model, x, p.temperature),
                                                                        x.responses), chunk)
    if s.on_policy:
        values = s.value(r.hidden).squeeze(-1).float() * mask  # (B, Tr)
        r.hidden = None
    else:
        values = by_prompt_length(r, lambda x: value_predictions(s.value, x), chunk)  # (B, Tr)
    return Batch(r, mask, r.logprobs, entropy, ref_logprobs, ref_full, values)


def score(cfg: DictConfig, s: Setup, prompts: list, b: Batch) -> torch.Tensor:
    """2. (B,) scores: the reward of each completion, minus the missing-EOS penalty; the first step fixes the
    base's mean score (over processes) as the baseline every score is centred by (ppo.center_scores)."""
    scores = s.reward(prompts, b.rollout.texts, b.rollout.ended.tolist()).to(b.mask.device).float()
    scores = scores - s.missing_eos_penalty * (~b.rollout.ended).float()
    if s.progress.score_baseline is None:
        s.progress.score_baseline = s.accelerator.reduce(scores.mean().to(s.accelerator.device), "mean").item() \
            if cfg.ppo.center_scores else 0.0
    return scores


def kl_into_reward(cfg: DictConfig, s: Setup, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """3. (B, Tr) per-token rewards: the KL penalty's reward part, −α·log π(y_t) (entropy_bonus=reward: the k1
    estimator of +α·H), the centred score at each completion's last token; and the KL measured per state."""
    p = cfg.ppo
    if s.kl.exact or s.trust_region:  # (B, Tr, V): π_old's whole next-token distribution at each state
        unwrapped = s.accelerator.unwrap_model(s.policy)
        b.old_full = by_prompt_length(b.rollout, lambda x: s.forward(unwrapped, x, p.temperature).log_softmax(-1),
                                      p.micro_batch_size)
    rewards, kl = s.kl.reward(b.logprobs, b.ref_logprobs, b.mask, s.kl_ctl.value, b.old_full, b.ref_full)
    if p.entropy_bonus == "reward":
        rewards = rewards - p.ent_coef * b.logprobs * b.mask
    last = b.mask.sum(1).long() - 1  # index of each completion's last token
    rewards[torch.arange(len(last)), last] += b.scores - s.progress.score_baseline
    return rewards, kl


STATS = ("pg_loss", "vf_loss", "entropy", "approxkl", "clipfrac", "vf_clipfrac", "ratio")


def update(cfg: DictConfig, s: Setup, b: Batch, out: Path) -> dict[str, list]:
    """5. ppo_epochs epochs over the rollout in minibatches (shuffled prompts, each prompt's completions
    together), each minibatch's gradient accumulated over micro-batches of similar prompt length (each cut to
    its own longest response); every term is a mean over the minibatch's tokens, so the split does not change
    the update. Returns each statistic's value per minibatch."""
    p, n = cfg.ppo, s.batches
    stats = {k: [] for k in (*STATS, *(["moved"] if s.trust_region else []))}
    for _ in range(p.ppo_epochs):
        order = (torch.randperm(n.prompts_per_device)[:, None] * p.samples_per_prompt
                 + torch.arange(p.samples_per_prompt)).flatten()
        for start in range(0, n.rollout_per_device, n.minibatch_per_device):
            idx = order[start:start + n.minibatch_per_device]
            n_tokens = b.mask[idx].sum().clamp_min(1)
            sums = dict.fromkeys(stats, 0.0)
            for micro in length_chunks(b.rollout, idx, p.micro_batch_size):
                for key, x in micro_step(cfg, s, b, micro, n_tokens, out).items():
                    sums[key] += x
            if p.max_grad_norm:
                s.accelerator.clip_grad_norm_(s.params, p.max_grad_norm)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad()
            for key in stats:
                stats[key].append(torch.as_tensor(sums[key]))
    return stats


def micro_step(cfg: DictConfig, s: Setup, b: Batch, micro: torch.Tensor, n_tokens: torch.Tensor,
               out: Path) -> dict[str, torch.Tensor]:
    """One micro-batch's forward and backward: the loss (ppo_loss) over rows `micro` of the rollout, its
    gradient accumulated; its statistics' shares of the minibatch means."""
    p = cfg.ppo
    mb = select(b.rollout, micro)
    w = width(mb)
    m, old_logprobs, adv, old_v, ret = (x[micro, :w] for x in (b.mask, b.logprobs, b.advantages, b.values, b.returns))
    if s.on_policy:
        logits, h = s.forward(s.policy, mb, p.temperature, hidden=True)
        v = s.value(h.detach() if p.value_model == "head" else h).squeeze(-1).float()
    else:
        logits, v = s.forward(s.policy, mb, p.temperature), value_predictions(s.value, mb)
    logprobs = token_logprobs(logits, mb.responses)
    entropy = entropy_from_logits(logits)  # keeps its gradient: the α·H loss term
    full = logits.log_softmax(-1) if s.kl.exact or s.trust_region else None  # (b, w, V)
    kl_loss = s.kl.loss(full, b.ref_full[micro, :w] if s.kl.exact else None, m, s.kl_ctl.value, b.adv_scale, n_tokens)
    moved = state_kl(b.old_full[micro, :w], full) if s.trust_region else None  # KL(π_old ‖ π_θ) per state
    loss, terms = ppo_loss(logprobs, old_logprobs, adv, v, old_v, ret, m, n_tokens, clip_range=p.clip_range,
                           clip_range_value=p.clip_range_value, vf_coef=p.vf_coef, entropy=entropy,
                           ent_weight=p.ent_coef * b.adv_scale if p.entropy_bonus == "loss" else None,
                           kl_loss=kl_loss, moved=moved, trust_region_coef=p.trust_region_coef)
    if not torch.isfinite(loss):
        mean = lambda key: ((terms[key] * m).sum() / n_tokens).item()
        _fail(out, s.accelerator, f"non-finite PPO loss at step {s.progress.step + 1} (pg {mean('pg_loss'):.4g}, "
              f"vf {mean('vf_loss'):.4g}, entropy {mean('entropy'):.4g}); last good checkpoint: "
              f"{_last_checkpoint(out) or 'none'}")
    s.accelerator.backward(loss)
    with torch.no_grad():
        log_ratio, ratio = terms.pop("log_ratio"), terms["ratio"]
        terms.update(approxkl=0.5 * log_ratio ** 2, clipfrac=((ratio - 1).abs() > p.clip_range).float(),
                     vf_clipfrac=((v - old_v).abs() > p.clip_range_value).float())
        return {key: (x * m).sum() / n_tokens for key, x in terms.items()}


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor, *,
             clip_range: float, clip_range_value: float, vf_coef: float, entropy: torch.Tensor,
             ent_weight: Optional[torch.Tensor] = None, kl_loss: Optional[torch.Tensor] = None,
             moved: Optional[torch.Tensor] = None, trust_region_coef: float = 0.0):
    """PPO's loss over (b, w) response tokens (mask 1 on real ones), each term a sum over them / n_tokens (the
    minibatch's real tokens: micro-batches add up to the minibatch mean). With ρ_t = exp(log π_θ − log π_old):

        policy   max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))                           ε = clip_range
        value    ½·max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε_v, ε_v) − R_t)²)   ε_v = clip_range_value
        loss     Σ policy/n + vf_coef·Σ value/n − ent_weight·Σ H_t/n + kl_loss + trust_region_coef·Σ moved_t/n

    ent_weight: α·(1/std A) for the entropy bonus as a loss term (None: none); kl_loss: the KL penalty's direct
    part (KLPenalty.loss); moved: KL(π_old(·|s_t) ‖ π_θ(·|s_t)), the trust region. Returns (loss, the per-token
    terms: pg_loss, vf_loss, entropy, moved if given, log_ratio, ratio)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf_losses = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    pg_loss, vf_loss, ent = ((x * mask).sum() / n_tokens for x in (pg_losses, vf_losses, entropy))
    loss = pg_loss + vf_coef * vf_loss
    if ent_weight is not None:
        loss = loss - ent_weight * ent
    if kl_loss is not None:
        loss = loss + kl_loss
    terms = {"pg_loss": pg_losses, "vf_loss": vf_losses, "entropy": entropy}
    if moved is not None:
        terms["moved"] = moved
        loss = loss + trust_region_coef * (moved * mask).sum() / n_tokens
    return loss, {**terms, "log_ratio": log_ratio, "ratio": ratio}


def metrics_row(b: Batch, stats: dict[str, list], beta: float) -> dict[str, torch.Tensor]:
    """One step's metrics (this process's): the objective's terms over the rollout, the update's statistics
    averaged over its minibatches, values, returns, advantages and the rollout's lengths."""
    seq_kl = b.kl.sum(1)
    return {
        "objective/kl": seq_kl.mean(), "objective/kl_coef": torch.tensor(beta),
        "objective/entropy": b.entropy, "objective/scores": b.scores.mean(),
        "objective/non_score_reward": (-beta * seq_kl).mean(),
        "objective/rlhf_reward": (b.scores - beta * seq_kl).mean(),
        "policy/approxkl": _mean(stats["approxkl"]), "policy/clipfrac": _mean(stats["clipfrac"]),
        "policy/entropy": _mean(stats["entropy"]), "policy/ratio": _mean(stats["ratio"]),
        # the exact KL(π_old ‖ π_θ) at the visited states before each minibatch (with the trust region only)
        **({"policy/state_kl_moved": _mean(stats["moved"])} if "moved" in stats else {}),
        "loss/policy": _mean(stats["pg_loss"]), "val/vf_loss": _mean(stats["vf_loss"]),
        "val/clipfrac": _mean(stats["vf_clipfrac"]), "val/mean": masked_mean(b.values, b.mask),
        "ppo/returns/mean": masked_mean(b.returns, b.mask), "ppo/advantages/mean": masked_mean(b.advantages, b.mask),
        "rollout/length": b.mask.sum(1).mean(), "rollout/eos_rate": b.rollout.ended.float().mean(),
    }


def reduce_row(accelerator: Accelerator, row: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each metric averaged over processes."""
    return {k: accelerator.reduce(v.detach().float().to(accelerator.device), "mean").item() for k, v in row.items()}


def end_step(cfg: DictConfig, s: Setup, row: dict, b: Batch, out: Path, started: float, step_start: float) -> dict:
    """The step's bookkeeping: β's update, the counters, the exact and along-training metrics due at this
    step, the metrics row written (main process) and a resumable checkpoint when due. Returns the row."""
    p, a, progress = cfg.ppo, s.accelerator, s.progress
    s.kl_ctl.update(row["objective/kl"], s.batches.rollout)
    progress.step += 1
    progress.samples_scored += s.batches.rollout
    progress.tokens_trained += int(a.reduce(b.mask.sum().to(a.device), "sum").item())
    progress.wall_time_s = time.time() - started
    row.update({"step": progress.step, "ppo/lr": s.scheduler.get_last_lr()[0], "time/step_s": time.time() - step_start,
                "budget/samples_scored": progress.samples_scored})
    if s.exact_metrics is not None and (progress.step % p.log_every == 0 or progress.step == p.steps):
        row.update(s.exact_metrics(a.unwrap_model(s.policy), s.kl_ctl.value))
    if s.curve is not None:
        policy, due = a.unwrap_model(s.policy), progress.step in s.curve_steps
        if due or s.curve.moved(policy, cfg.curve.max_gap):
            budget = ratings_budget(cfg) if cfg.reward == "rm" else progress.samples_scored
            row.update(s.curve.point(policy, budget, s.kl_ctl.value if cfg.reward == "gold" else None, p.ent_coef),
                       **({} if due else {"frontier/by_gap": 1.0}))
    if a.is_main_process:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        tracking.log(row, step=progress.step)
    if progress.step % p.save_every == 0 and progress.step < p.steps:
        _checkpoint(out, a, progress.step)
    return row


def finish(cfg: DictConfig, run: Run, s: Setup) -> None:
    """Save the HF-loadable policy (LoRA merged in) and the final metrics, finish the manifest, drop the
    resumable checkpoints, and take the DDP wrappers down before the process group."""
    a, out = s.accelerator, run.out
    a.wait_for_everyone()
    last_row = None
    if a.is_main_process:
        last_row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

        def save(tmp: Path) -> None:
            final = a.unwrap_model(s.policy)
            if cfg.peft.enabled:
                final.save_pretrained(tmp / "adapter")
                final = final.merge_and_unload()
            final.save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(last_row, indent=1) + "\n")

        publish(out, save)
    # wall_time_s: the resumable counter (every interrupted session's time included)
    progress = s.progress
    run.finish(reward=cfg.reward, samples_scored=getattr(s.reward, "samples_scored", progress.samples_scored),
               steps=progress.step, tokens_trained=progress.tokens_trained, wall_time_s=progress.wall_time_s,
               world_size=a.num_processes, final=last_row)
    if a.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        note(f"saved {out}")
    # The DDP wrappers go before the process group. A DDP Reducer that drops the group's last reference
    # destroys it holding the GIL, joining a gloo worker thread that waits for the GIL to free a finished
    # collective's tensors: a torch deadlock at exit, at random (a two-process CPU run hung after saving).
    # Freed here, the group's last reference goes in destroy_process_group, whose destructor releases the GIL.
    a.wait_for_everyone()
    s.policy = s.value = None
    a.free_memory()
    a.end_training()


def k1_shares(estimator: str, blend: float, length: int) -> torch.Tensor:
    """c_t, the share of state t's KL that enters through its sampled token (k1), the rest exactly
    (analytic), for the response's states t = 0..length−1: k1 1, analytic 0, and blend 1 at t = 0 and
    `blend` after it. Every sample of a prompt visits its state 0, where k1's control variate leaves no
    gradient noise at π*; a later state is visited only by the samples that took its path, and there a
    token no sample draws gets no k1 gradient (PPO can close a path for good) while the exact term
    pulls it back toward π_ref."""
    share = torch.full((length,), {"k1": 1.0, "analytic": 0.0, "blend": blend}[estimator])
    if estimator == "blend":
        share[:1] = 1.0
    return share


def kl_rewards(log_ratio: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, share: torch.Tensor,
               beta: float) -> torch.Tensor:
    """The KL penalty's per-token rewards (B, Tr) for k1 shares c_t (Tr,):
    reward_t = −β·(c_t·ℓ_t + (1 − c_{t+1})·KL_{t+1}), with ℓ_t = log π(y_t|s_t) − log π_ref(y_t|s_t) the
    sampled token's log-ratio and KL_t = KL(π(·|s_t)‖π_ref(·|s_t)) (masked, 0 past the end). The rest of
    the gradient of β·E[Σ_t KL_t], the direct part β·(1 − c_t)·∇_θ KL_t, is a loss term. Any c_t in [0, 1]
    gives an unbiased gradient: state t's KL enters either through its sampled token's score function
    (∇log π(y_≤t)·ℓ_t) or exactly (∇log π(y_<t)·KL_t plus ∇_θ KL_t)."""
    rewards = -beta * share * log_ratio * mask
    rewards[:, :-1] -= beta * (1 - share[1:]) * kl[:, 1:]
    return rewards


def state_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(π(·|s_t) ‖ π_ref(·|s_t)) = Σ_v π(v|s_t)·(log π(v|s_t) − log π_ref(v|s_t)) at each state, nats:
    (B, T) from (B, T, V) log-probabilities (ppo.kl_estimator=analytic or blend, the trust region)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


# ------------------------------------------------------------------------------ plumbing


def _head(model):
    return getattr(model, "score", None) or model.classifier


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(xs).mean()


def _bandit_setup(cfg, tokenizer, reference):
    """A function of the policy giving the bandit metrics: TV to the closed-form optimum."""
    if cfg.world.max_tokens > 1:
        return _sequence_bandit_setup(cfg, tokenizer, reference)
    if cfg.peft.enabled:
        with reference.disable_adapter():
            pi0 = next_token_probs(reference, tokenizer, cfg.world.prompt)
    else:
        pi0 = next_token_probs(reference, tokenizer, cfg.world.prompt)
    r = reward_vector(tokenizer, cfg.world, len(pi0))
    best = int(r.argmax())

    def metrics(policy, beta: float) -> dict:  # β: the current one (klauto adapts it)
        pi = next_token_probs(policy, tokenizer, cfg.world.prompt)
        target = optimum(pi0, r, beta, cfg.ppo.ent_coef)
        return {"bandit/tv_to_optimum": total_variation(pi, target), "bandit/best_token_prob": pi[best].item(),
                "bandit/expected_reward": float((pi * r.double()).sum()), "bandit/kl": kl_divergence(pi, pi0)}

    return metrics


def _sequence_bandit_setup(cfg, tokenizer, reference):
    """The sequence bandit's metrics: the exact answer distribution over the table's texts (evaluator)
    against π* over whole completions, both normalised over the table's texts."""
    answers = [text for text, _ in cfg.world.rewards]
    clean = np.array([float(r) for _, r in cfg.world.rewards])
    unclean = np.full(len(answers), float(cfg.world.default_reward))  # the text, then not EOS
    with reference.disable_adapter() if cfg.peft.enabled else nullcontext():
        base = answer_distribution(reference, tokenizer, cfg.world.prompt, answers, None)

    def metrics(policy, beta: float) -> dict:
        dist = answer_distribution(policy, tokenizer, cfg.world.prompt, answers, None)
        target = answer_optimum(base, clean, unclean, beta, cfg.ppo.ent_coef)
        return {"bandit/tv_to_optimum": optimum_tv(dist.probs, target), "bandit/table_mass": float(dist.probs.sum()),
                **{f"bandit/p/{a.strip()}": float(q) for a, q in zip(answers, dist.probs / dist.probs.sum())},
                **{f"bandit/optimum/{a.strip()}": float(q) for a, q in zip(answers, target)}}

    return metrics


def _last_checkpoint(out: Path):
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _checkpoint(out: Path, accelerator: Accelerator, step: int) -> None:
    """accelerate's save_state (models, optimiser, scheduler, every process's RNG; β and progress through
    _save_json_state) into a temporary directory renamed into place: a kill mid-save leaves the last one intact."""
    tmp = out / "checkpoints" / f"tmp-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    accelerator.wait_for_everyone()
    with quiet_logger("accelerate.utils.other"):  # "Removed shared tensor ...": a tied embedding, saved once
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(out / "checkpoints" / f"step-{step}")
        for old in (out / "checkpoints").glob("step-*"):
            if old.name != f"step-{step}":
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _save_json_state(directory: str, accelerator: Accelerator, kl_ctl: KLController, progress: Progress) -> None:
    """β and the counters as JSON (accelerate's register_for_checkpointing would pickle them, and its
    load_state unpickles those files with code execution allowed)."""
    if accelerator.is_main_process:
        Path(directory).mkdir(parents=True, exist_ok=True)
        state = {"kl_ctl": kl_ctl.state_dict(), "progress": progress.state_dict()}
        (Path(directory) / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def _load_checkpoint(accelerator: Accelerator, ckpt: Path, kl_ctl: KLController, progress: Progress) -> None:
    """accelerate's load_state (weights from safetensors; optimiser, scheduler and RNG states through
    torch.load with weights_only=True), then β and the counters from state.json. Nothing is unpickled:
    a custom_checkpoint_*.pkl (which load_state would unpickle with code execution allowed) is refused."""
    pickles = sorted(f.name for f in ckpt.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise ConfigError(f"{ckpt} holds {', '.join(pickles)}: a pickle the lab never writes, not loaded "
                          f"(delete {ckpt.parent} to restart the run)")
    _restore_rng_state(ckpt, accelerator.process_index)
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_ctl"])
    progress.load_state_dict(state["progress"])


def _restore_rng_state(ckpt: Path, process: int) -> None:
    """This process's RNG states from the checkpoint (as load_state restores them, weights_only). load_state
    itself skips a state it cannot load (a damaged or planted random_states_<i>.pkl) without a word, and the
    resumed run then draws other samples than the interrupted one would have: refused here, in one line."""
    from accelerate.utils import load

    f = ckpt / f"random_states_{process}.pkl"
    try:
        states = load(f)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
    except Exception as e:  # noqa: BLE001 (unpickling and the setters raise many types; each means the same)
        raise ConfigError(f"{f} cannot restore the run's random state ({e.__class__.__name__}): the resumed run "
                          f"would not be the interrupted one's; repair: rm -r {ckpt} and rerun the command "
                          "(the run restarts)") from None


def _drop_metrics_after(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: the killed run's rows for them go (and a row
    cut short by the kill), so steps strictly increase."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _fail(out: Path, accelerator: Accelerator, message: str):
    if accelerator.is_main_process:
        write_manifest(out, {**(read_manifest(out) or {}), "status": "failed", "error": message})
    raise FloatingPointError(message)


# the regime's one declaration (collapse_lab/stages/stage.py): the registry names an entry per recipe of kind ppo (kl0,
# kl0.1, klauto, ent0.01, ...); its run directory's keys: the base, the world, the seed, the reward, this section,
# LoRA and curve
REGIME = Stage(STAGE, train_ppo, section=STAGE, schema=PPOSection, consumes=(BASE, REWARD), group=ONLINE,
               rating_budget=online_rating_budget(STAGE), kl_key="ppo.kl_coef", adaptive_kl_key="ppo.adaptive_kl",
               check=lambda cfg: batch_sizes(cfg.ppo, world_size()))  # its batch arithmetic divides exactly
