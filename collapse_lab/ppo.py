"""Classic RLHF PPO (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N+
implementation details of RLHF with PPO"), one step = the five numbered steps of `train_ppo`:

    1. rollout   sample completions from the policy (temperature T, the FULL vocabulary, EOS
                 allowed everywhere: the sampled distribution is the one the update optimises)
    2. score     reward at the last token: gold rater or reward model; −penalty if cut off;
                 centred by the base's mean score (the first rollout's): the optimum is
                 unchanged, and the zero-initialised value head starts near the returns
    3. KL        per-token reward −β·(log π − log π_ref) − α·log π, π_ref the frozen base: the
                 k1 estimators of −β·KL and +α·H, so the sequence-level optimum is
                 π*(y) ∝ π_ref(y)^(β/(α+β))·e^{r(y)/(α+β)} (collapse_lab/optimum.py). By default
                 (`ppo.kl_estimator=blend`) k1 only at the prompt's state; each later state's KL is
                 taken exactly over the vocabulary: the next states' KL in the reward and its direct
                 gradient a loss term (`kl_rewards`; the same gradient in expectation)
    4. GAE       values V(s_t), δ_t = r_t + γV_{t+1} − V_t,
                 A_t = Σ_l (γλ)^l δ_{t+l}, returns = A + V, advantages whitened
                 (λ = 1: A_t = return − V(s_t), unbiased whatever V is)
    5. update    K epochs of minibatches: clipped policy loss, clipped value loss (and, with
                 `ppo.entropy_bonus=loss`, CleanRL's −α·H(π(·|s)) term instead of step 3's)

Recipes: β = `ppo.kl_coef` (`kl0`, `kl0.1`, ...; `klauto` adapts it), α = `ppo.ent_coef`.
Along training (`curve.points` evaluations, collapse_lab/frontier.py) each metrics row gains the policy's
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import AutoModelForTokenClassification, get_scheduler

from collapse_lab import tracking
from collapse_lab.bandit import kl_divergence, next_token_probs, optimum, reward_vector, total_variation
from collapse_lab.checkpoint import publish, read_manifest, write_manifest
from collapse_lab.config import ConfigError, run_dir
from collapse_lab.distributed import exact_div
from collapse_lab.models import DTYPES, add_lora, load_pretrained, mixed_precision
from collapse_lab.evaluator import answer_distribution
from collapse_lab.frontier import Curve, schedule
from collapse_lab.optimum import answer_optimum, optimum_tv
from collapse_lab.pretrain import resolve_base
from collapse_lab.rewards import make_reward
from collapse_lab.stage import Run, ratings_budget, stage_function
from collapse_lab.rollout import (Rollout, by_prompt_length, entropy_from_logits, generate_by_length, length_chunks,
                                  packed_response_logits, packs, position_ids, response_logits, select, token_logprobs,
                                  width)
from collapse_lab.world import make_world

STAGE = "ppo"


def stage_keys(cfg: DictConfig) -> tuple[str, ...]:
    """What a PPO run depends on (its directory's hash)."""
    keys = ("seed", "base_path", "model", "peft", "world", "reward", "ppo", "curve")
    if not cfg.base_path and not cfg.model.path:
        keys += ("pretrain",)  # the lab's own base is made from these
    if cfg.reward == "rm":
        keys += ("reward_model_path",) if cfg.reward_model_path else ("ratings", "reward_model")
    return keys


def ppo_dir(cfg: DictConfig, named: bool = True) -> Path:
    kl = "klauto" if cfg.ppo.adaptive_kl else f"kl{cfg.ppo.kl_coef:g}"
    ent = f"-ent{cfg.ppo.ent_coef:g}" if cfg.ppo.ent_coef else ""
    return run_dir(cfg, STAGE, stage_keys(cfg), f"{cfg.model.name}-{cfg.world.name}-{kl}{ent}-s{cfg.seed}", named)


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
    input is checked, and an interrupted run resumes from its last checkpoint)."""
    p, out = cfg.ppo, run.out
    bandit_world = cfg.world.name == "bandit"  # episodes of one token (or max_tokens, then EOS)
    max_new_tokens, missing_eos_penalty = p.max_new_tokens, p.missing_eos_penalty
    if bandit_world:
        max_new_tokens, missing_eos_penalty = (1 if cfg.world.max_tokens == 1 else cfg.world.max_tokens + 1), 0.0
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
    on_policy = p.value_model != "separate"  # values read off the policy's hidden states
    analytic_kl = p.kl_estimator != "k1"  # some state's KL taken exactly over the vocabulary
    trust_region = p.trust_region_coef > 0
    # every forward of a rollout's responses (identical results; the packed one skips per-row prompt copies)
    forward = packed_response_logits if packs(policy) else response_logits
    policy.eval(), value.eval()  # dropout off: log-probs must match between rollout and update
    groups = [{"params": [q for q in m.parameters() if q.requires_grad], "lr": lr}
              for m, lr in ((policy, p.lr), (value, p.value_lr or p.lr))]
    params = [q for g in groups for q in g["params"]]
    optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
    updates = p.steps * p.ppo_epochs * batches.minibatches
    scheduler = get_scheduler("linear" if p.anneal_lr else "constant", optimizer, 0, updates)
    policy, value, optimizer, scheduler = accelerator.prepare(policy, value, optimizer, scheduler)
    if ref is not None:
        ref = ref.to(accelerator.device)

    world = make_world(cfg.world)
    reward = make_reward(cfg, world, accelerator.device)
    kl_ctl = KLController(p)
    progress = Progress()
    # β and the counters go into every save_state directory as JSON (_checkpoint, _load_checkpoint)
    accelerator.register_save_state_pre_hook(lambda _m, _w, d: _save_json_state(d, accelerator, kl_ctl, progress))
    resume = _last_checkpoint(out)
    if resume:
        _load_checkpoint(accelerator, resume, kl_ctl, progress)
        accelerator.print(f"resuming from {resume} (step {progress.step})")
    if accelerator.is_main_process:
        _drop_metrics_after(out / "metrics.jsonl", progress.step)
    reference = ref if ref is not None else accelerator.unwrap_model(policy)
    bandit = _bandit_setup(cfg, tokenizer, reference) if bandit_world else None
    curve = None  # along-training evaluation on the seed prompts (and the TV to π*: gold reward only)
    if not bandit_world and accelerator.is_main_process:
        with reference.disable_adapter() if ref is None else nullcontext():
            curve = Curve(reference, tokenizer, world) or None
    curve_steps = schedule(p.steps, cfg.curve.points, cfg.curve.spacing)

    run.start(resume=True, base_path=base)  # after every input is checked: rejected input leaves no run directory
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=p.steps, initial=progress.step, desc=f"ppo {out.name}", disable=not accelerator.is_main_process)
    started = time.time() - progress.wall_time_s
    while progress.step < p.steps:
        step_start = time.time()
        unwrapped = accelerator.unwrap_model(policy)
        seed_here = f"{cfg.seed}/{accelerator.process_index}/{progress.step}"  # prompts and rater noise
        prompt_rng = random.Random(f"ppo-prompts/{seed_here}")
        prompts = [q for q in (world.train_prompt(prompt_rng) for _ in range(batches.prompts_per_device))
                   for _ in range(p.samples_per_prompt)]  # each prompt's completions adjacent: one prefill
        reward.reseed(seed_here)

        # 1. rollout: completions with their log-probs under the sampling distribution (π at T, from
        #    the generation's logits), the reference's log-probs, values (rows batched by prompt length)
        with torch.no_grad(), accelerator.autocast():  # the reference is not prepared: autocast here too
            rollout = generate_by_length(unwrapped, tokenizer, [q.text for q in prompts], max_new_tokens,
                                         p.temperature, hidden=on_policy, chunk=p.generation_batch_size)
            mask = rollout.response_mask.float()  # (B, Tr) 1 up to and including EOS
            logprobs = rollout.logprobs  # (B, Tr) nats
            entropy = masked_mean(rollout.entropy, mask)
            chunk = p.micro_batch_size
            ref_model = policy if ref is None else ref
            log_softmax = lambda model: (lambda r: forward(model, r, p.temperature).log_softmax(-1))
            with unwrapped.disable_adapter() if ref is None else nullcontext():
                if analytic_kl:  # (B, Tr, V): the reference's whole next-token distribution at each state
                    ref_full = by_prompt_length(rollout, log_softmax(ref_model), chunk)
                    ref_logprobs = ref_full.gather(2, rollout.responses.unsqueeze(-1)).squeeze(-1)
                else:
                    ref_logprobs = by_prompt_length(rollout, lambda r, model=ref_model: token_logprobs(
                        forward(model, r, p.temperature), r.responses), chunk)
            if on_policy:
                values = value(rollout.hidden).squeeze(-1).float() * mask  # (B, Tr)
                rollout.hidden = None
            else:
                values = by_prompt_length(rollout, lambda r: value_predictions(value, r), chunk)  # (B, Tr)

            # 2. score: the reward at the last token; completions cut off at max_new_tokens are penalised;
            #    centred by the base's mean score (a constant: every completion's objective moves alike)
            scores = reward(prompts, rollout.texts, rollout.ended.tolist()).to(mask.device).float()
            scores = scores - missing_eos_penalty * (~rollout.ended).float()
            if progress.score_baseline is None:
                progress.score_baseline = accelerator.reduce(scores.mean().to(accelerator.device), "mean").item() \
                    if p.center_scores else 0.0

            # 3. per-token KL penalty and entropy bonus into the reward (k1 estimators: their
            #    gradients are those of −β·KL(π‖π_ref) and +α·H(π) over whole completions)
            # (B, Tr, V): π_old's whole next-token distribution at each state (analytic KL, trust region)
            old_full = by_prompt_length(rollout, log_softmax(unwrapped), chunk) \
                if analytic_kl or trust_region else None
            if analytic_kl:  # KL_t at each visited state; a_t is credited with the LATER states' KL only
                kl = state_kl(old_full, ref_full) * mask
                share = k1_shares(p.kl_estimator, p.kl_blend, kl.shape[1]).to(kl)  # (Tr,) c_t
                rewards = kl_rewards(logprobs - ref_logprobs, kl, mask, share, kl_ctl.value)
            else:
                kl = (logprobs - ref_logprobs) * mask  # (B, Tr) nats
                rewards = -kl_ctl.value * kl
            if p.entropy_bonus == "reward":
                rewards = rewards - p.ent_coef * logprobs * mask
            last = mask.sum(1).long() - 1  # index of each completion's last token
            rewards[torch.arange(len(last)), last] += scores - progress.score_baseline

            # 4. GAE over response tokens, then whitened advantages
            advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
            # Whitening scales the reward's gradient by 1/std(A); every term of the reward (score, KL,
            # entropy) alike. A loss-term entropy bonus (entropy_bonus=loss) gets the same scale, but
            # 1/std(A) is a batch statistic, so its balance with the reward drifts (tested).
            adv_scale = torch.tensor(1.0)
            if p.whiten_advantages:
                advantages, adv_scale = masked_whiten(advantages, mask)

        # 5. K epochs of minibatch updates (loss = clipped policy loss + c_v·value loss [− α·H]), each
        #    minibatch's gradient accumulated over micro-batches of similar prompt length (each cut
        #    to its own longest response); every term is a mean over the minibatch's tokens, so the
        #    split does not change the update
        stats = {k: [] for k in ("pg_loss", "vf_loss", "entropy", "approxkl", "clipfrac", "vf_clipfrac", "ratio",
                                 *(["moved"] if trust_region else []))}
        for _ in range(p.ppo_epochs):
            order = (torch.randperm(batches.prompts_per_device)[:, None] * p.samples_per_prompt
                     + torch.arange(p.samples_per_prompt)).flatten()  # shuffled prompts, completions together
            for start in range(0, batches.rollout_per_device, batches.minibatch_per_device):
                idx = order[start:start + batches.minibatch_per_device]
                n_tokens = mask[idx].sum().clamp_min(1)
                sums = dict.fromkeys(stats, 0.0)
                for micro in length_chunks(rollout, idx, p.micro_batch_size):
                    mb = select(rollout, micro)
                    m, old_logprobs, adv, old_v, ret = (x[micro, :width(mb)] for x in
                                                        (mask, logprobs, advantages, values, returns))
                    if on_policy:
                        new_logits, h = forward(policy, mb, p.temperature, hidden=True)
                        v = value(h.detach() if p.value_model == "head" else h).squeeze(-1).float()
                    else:
                        new_logits, v = forward(policy, mb, p.temperature), value_predictions(value, mb)
                    log_ratio = (token_logprobs(new_logits, mb.responses) - old_logprobs) * m
                    ratio = torch.exp(log_ratio)
                    pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - p.clip_range, 1 + p.clip_range))
                    v_clipped = old_v + (v - old_v).clamp(-p.clip_range_value, p.clip_range_value)
                    vf_losses = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)
                    entropies = entropy_from_logits(new_logits)  # keeps its gradient: the α·H loss term
                    pg_loss, vf_loss, ent = ((x * m).sum() / n_tokens for x in (pg_losses, vf_losses, entropies))
                    loss = pg_loss + p.vf_coef * vf_loss
                    if p.entropy_bonus == "loss":
                        loss = loss - p.ent_coef * adv_scale * ent
                    new_full = new_logits.log_softmax(-1) if analytic_kl or trust_region else None  # (b, w, V)
                    if analytic_kl:  # the direct part of ∇(β·E[Σ_t KL_t]), on the advantages' scale
                        kl_now = state_kl(new_full, ref_full[micro, :width(mb)])
                        exact = (1 - share[:width(mb)]) * m  # (b, w) the exact share 1 − c_t
                        loss = loss + kl_ctl.value * adv_scale * (kl_now * exact).sum() / n_tokens
                    terms = {"pg_loss": pg_losses, "vf_loss": vf_losses, "entropy": entropies}
                    if trust_region:  # KL(π_old ‖ π_θ) at each visited state, every token
                        terms["moved"] = state_kl(old_full[micro, :width(mb)], new_full)
                        loss = loss + p.trust_region_coef * (terms["moved"] * m).sum() / n_tokens
                    if not torch.isfinite(loss):
                        _fail(out, accelerator, f"non-finite PPO loss at step {progress.step + 1} "
                              f"(pg {pg_loss.item():.4g}, vf {vf_loss.item():.4g}, entropy {ent.item():.4g}); "
                              f"last good checkpoint: {_last_checkpoint(out) or 'none'}")
                    accelerator.backward(loss)
                    with torch.no_grad():
                        terms.update(approxkl=0.5 * log_ratio ** 2, ratio=ratio,
                                     clipfrac=((ratio - 1).abs() > p.clip_range).float(),
                                     vf_clipfrac=((v - old_v).abs() > p.clip_range_value).float())
                        for key, x in terms.items():
                            sums[key] += (x * m).sum() / n_tokens
                if p.max_grad_norm:
                    accelerator.clip_grad_norm_(params, p.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                for key in stats:
                    stats[key].append(torch.as_tensor(sums[key]))

        # bookkeeping: β update, metrics (averaged over processes), checkpoint
        seq_kl = kl.sum(1)
        row = {
            "objective/kl": seq_kl.mean(), "objective/kl_coef": torch.tensor(kl_ctl.value),
            "objective/entropy": entropy, "objective/scores": scores.mean(),
            "objective/non_score_reward": (-kl_ctl.value * seq_kl).mean(),
            "objective/rlhf_reward": (scores - kl_ctl.value * seq_kl).mean(),
            "policy/approxkl": _mean(stats["approxkl"]), "policy/clipfrac": _mean(stats["clipfrac"]),
            "policy/entropy": _mean(stats["entropy"]), "policy/ratio": _mean(stats["ratio"]),
            # the exact KL(π_old ‖ π_θ) at the visited states before each minibatch (with the trust region only)
            **({"policy/state_kl_moved": _mean(stats["moved"])} if trust_region else {}),
            "loss/policy": _mean(stats["pg_loss"]), "val/vf_loss": _mean(stats["vf_loss"]),
            "val/clipfrac": _mean(stats["vf_clipfrac"]), "val/mean": masked_mean(values, mask),
            "ppo/returns/mean": masked_mean(returns, mask), "ppo/advantages/mean": masked_mean(advantages, mask),
            "rollout/length": mask.sum(1).mean(), "rollout/eos_rate": rollout.ended.float().mean(),
        }
        row = {k: accelerator.reduce(v.detach().float().to(accelerator.device), "mean").item() for k, v in row.items()}
        kl_ctl.update(row["objective/kl"], batches.rollout)
        progress.step += 1
        progress.samples_scored += batches.rollout
        progress.tokens_trained += int(accelerator.reduce(mask.sum().to(accelerator.device), "sum").item())
        progress.wall_time_s = time.time() - started
        row.update({"step": progress.step, "ppo/lr": scheduler.get_last_lr()[0], "time/step_s": time.time() - step_start,
                    "budget/samples_scored": progress.samples_scored})
        if bandit is not None and (progress.step % p.log_every == 0 or progress.step == p.steps):
            row.update(bandit(accelerator.unwrap_model(policy), kl_ctl.value))
        if curve is not None and progress.step in curve_steps:
            budget = ratings_budget(cfg) if cfg.reward == "rm" else progress.samples_scored
            row.update(curve.point(accelerator.unwrap_model(policy), budget,
                                   kl_ctl.value if cfg.reward == "gold" else None, p.ent_coef))
        if accelerator.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            tracking.log(row, step=progress.step)
            bar.set_postfix({"kl": f"{row['objective/kl']:.3f}", "score": f"{row['objective/scores']:.2f}"})
        bar.update(1)
        if progress.step % p.save_every == 0 and progress.step < p.steps:
            _checkpoint(out, accelerator, progress.step)
    bar.close()

    # save: the HF-loadable policy (LoRA merged in), final metrics, manifest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        last_row = json.loads(metrics_file.read_text().splitlines()[-1])

        def save(tmp: Path) -> None:
            final = accelerator.unwrap_model(policy)
            if cfg.peft.enabled:
                final.save_pretrained(tmp / "adapter")
                final = final.merge_and_unload()
            final.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(last_row, indent=1) + "\n")

        publish(out, save)
    # wall_time_s: the resumable counter (every interrupted session's time included)
    run.finish(reward=cfg.reward, samples_scored=getattr(reward, "samples_scored", progress.samples_scored),
               steps=progress.step, tokens_trained=progress.tokens_trained, wall_time_s=progress.wall_time_s,
               world_size=accelerator.num_processes, final=last_row if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        print(f"saved {out}")
    # The DDP wrappers go before the process group. A DDP Reducer that drops the group's last reference
    # destroys it holding the GIL, joining a gloo worker thread that waits for the GIL to free a finished
    # collective's tensors: a torch deadlock at exit, at random (a two-process CPU run hung after saving).
    # Freed here, the group's last reference goes in destroy_process_group, whose destructor releases the GIL.
    accelerator.wait_for_everyone()
    policy = value = None  # the closures' cells too (save() reads policy)
    accelerator.free_memory()
    accelerator.end_training()


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
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_ctl"])
    progress.load_state_dict(state["progress"])


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
