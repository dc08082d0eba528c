"""Plumbing shared by the online regimes run through TRL's trainers (collapse_lab/regimes/rloo.py, grpo.py): the
prompt dataset, the lab's reward as a TRL reward function, the trainer's arguments, the save and the budget.
The update rules are TRL's; each regime file states its own.

TRL fits this lab: RLOOTrainer and GRPOTrainer take the base's directory (a lab run is a directory: the
reference model is loaded from it), a reward FUNCTION, and prompts as text. The reward function is the
lab's one interface (collapse_lab/stages/rewards.py): `reward=gold` (the world's rater, noisy) and `reward=rm`
(the reward model trained on FeedME's ratings) both wrap into it, so nothing of TRL's is replaced.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig

from collapse_lab.core import tracking
from collapse_lab.core.console import note
from collapse_lab.world.bandit import next_token_probs, optimum, reward_vector, total_variation
from collapse_lab.core.config import run_dir
from collapse_lab.core.distributed import exact_div
from collapse_lab.evaluation.frontier import Curve, callbacks
from collapse_lab.models.models import load_pretrained
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.stages.rewards import make_reward, reward_func
from collapse_lab.stages.stage import Stage, device, hf_args, ratings_budget, run_stage, save_policy
from collapse_lab.world.world import make_world


def online_dir(cfg: DictConfig, regime: Stage, named: bool) -> Path:
    """The run directory of an online regime (its declaration `regime`: the keys of its hash, as PPO's)."""
    stage, s = regime.name, cfg[regime.section]
    return run_dir(cfg, stage, regime.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-{stage}-kl{s.kl_coef:g}"
                   f"-{cfg.reward}-s{cfg.seed}", named)


def check_online(section: str):
    """An online TRL regime's batch arithmetic and options, before any work (registry.check_plan)."""
    def check(cfg: DictConfig) -> None:
        s = cfg[section]
        exact_div(s.rollout_batch_size, s.samples_per_prompt, f"{section}.rollout_batch_size over {section}.samples_per_prompt")
    return check


def prompt_dataset(world, n: int, seed) -> Dataset:
    """n prompt draws from the regimes' training distribution (world.train_prompt), seeded."""
    rng = random.Random(f"online-prompts/{seed}")
    return Dataset.from_dict({"prompt": [world.train_prompt(rng).text for _ in range(n)]})


def train_online(cfg: DictConfig, named: bool, regime: Stage, trainer_cls, config_cls, **loss_args) -> Path:
    """Run (or find finished) the online regime declared by `regime`, whose update rule is TRL's `trainer_cls`
    with `loss_args`."""
    stage, s = regime.name, cfg[regime.section]
    per_step = exact_div(s.rollout_batch_size, s.samples_per_prompt, f"{stage}.rollout_batch_size over "
                         f"{stage}.samples_per_prompt")
    out = online_dir(cfg, regime, named)
    with run_stage(cfg, out, stage, "{steps} steps") as run:
        if run.done:
            return out
        base = resolve_base(cfg)
        world = make_world(cfg.world)
        reward = make_reward(cfg, world, device())  # reward=rm: the resolved reward model (never trained here)
        run.start(base_path=base, reward=cfg.reward)
        reference, tokenizer = load_pretrained(base, cfg.model.dtype)
        curve = Curve(reference.to(device()), tokenizer, world) or None  # the base's side of the curve, once
        del reference
        max_new_tokens, penalty = world.episode(s.max_new_tokens, s.missing_eos_penalty)
        score = reward_func(reward, world, tokenizer.eos_token_id, penalty)
        args = hf_args(config_cls, cfg, out, seed=cfg.seed, lr=s.lr, batch_size=s.rollout_batch_size,
                       max_steps=s.steps, num_generations=s.samples_per_prompt, steps_per_generation=1,
                       max_completion_length=max_new_tokens, temperature=s.temperature, beta=s.kl_coef,
                       num_iterations=1, lr_scheduler_type="linear" if s.anneal_lr else "constant", warmup_steps=0,
                       logging_steps=1, disable_dropout=True, max_grad_norm=s.max_grad_norm,
                       model_init_kwargs={"dtype": cfg.model.dtype}, **loss_args)
        from peft import LoraConfig

        # LoRA (peft.enabled): TRL wraps the base in the adapter; its reference is the base with the adapter off
        lora = None if not cfg.peft.enabled else LoraConfig(
            r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
            target_modules=cfg.peft.target_modules, task_type="CAUSAL_LM")
        trainer = trainer_cls(model=base, reward_funcs=score, args=args, processing_class=tokenizer, peft_config=lora,
                              train_dataset=prompt_dataset(world, s.steps * per_step, cfg.seed),
                              callbacks=callbacks(curve, cfg.curve.points, lambda: ratings_budget(cfg) if cfg.reward == "rm"
                                                  else trainer.state.global_step * s.rollout_batch_size,
                                                  spacing=cfg.curve.spacing, max_gap=cfg.curve.max_gap))
        tracking.quiet(trainer)
        trainer.train()
        # TRL's training rows (with a loss) and the curve's points (frontier/*, appended by the callback)
        log = [dict(x, step=x.get("step", i + 1)) for i, x in enumerate(trainer.state.log_history)
               if "loss" in x or "frontier/kl" in x]
        train_rows = [x for x in log if "loss" in x]
        extra = bandit_tv(trainer.model, base, tokenizer, cfg, s.kl_coef) if world.reward_table is not None else {}
        policy = trainer.model.merge_and_unload() if cfg.peft.enabled else trainer.model  # plain HF weights
        save_policy(out, policy, tokenizer, log)
        steps = trainer.state.global_step
        tokens = int(sum(x.get("completions/mean_length", 0) for x in train_rows) * s.rollout_batch_size)
        run.finish(samples_scored=getattr(reward, "samples_scored", None) or steps * s.rollout_batch_size,
                   steps=steps, tokens_trained=tokens, kl_coef=s.kl_coef, **extra,
                   final={k: v for k, v in (train_rows[-1] if train_rows else {}).items() if isinstance(v, (int, float))})
        note(f"saved {out}: {stage} β={s.kl_coef:g}, {steps} steps" +
              (f", bandit TV to π* {extra['bandit_tv_to_optimum']:.4f}" if extra else ""))
    return out


@torch.no_grad()
def bandit_tv(model, base: str, tokenizer, cfg: DictConfig, beta: float) -> dict:
    """world=bandit: the TV between the policy's full next-token distribution at the prompt and π* ∝ π0·e^{r/β}."""
    ref, _ = load_pretrained(base, cfg.model.dtype)
    pi0 = next_token_probs(ref.to(model.device).eval(), tokenizer, cfg.world.prompt)
    pi = next_token_probs(model.eval(), tokenizer, cfg.world.prompt)
    r = reward_vector(tokenizer, cfg.world, len(pi0))
    return {"bandit_tv_to_optimum": total_variation(pi, optimum(pi0, r, beta)),
            "bandit_tv_base_to_optimum": total_variation(pi0, optimum(pi0, r, beta)),
            "bandit_expected_reward": float((pi * r.double()).sum()),
            "bandit_best_token_prob": float(pi[int(np.argmax(r.numpy()))])}
