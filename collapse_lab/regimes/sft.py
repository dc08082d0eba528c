"""FeedME (text-davinci-002 style): supervised fine-tuning on the top-rated of each prompt's k samples.

    1. ratings   round 1: the ratings stage (collapse_lab/stages/ratings.py), the same rated samples the
                 reward model is trained on; round r > 1 (sft.rounds, iterated FeedME): n new prompts,
                 k samples each from the CURRENT model, rated the same way
    2. keep      per prompt draw, the sft.keep_top highest-scored samples (ties: the lowest sample
                 index, i.e. a uniformly random one among tied i.i.d. samples), and only those scoring
                 >= sft.min_score when set; sft.select=random (the control, recipe sft-random): the same
                 number per prompt drawn uniformly from its k, scores ignored (seeded by seed and round)
    3. train     TRL's SFTTrainer on (prompt, completion) token sequences exactly as sampled, loss on
                 completion tokens only (the prompt's are masked to -100); EOS is part of the target
                 when the sample ended with it, not otherwise
    4. save      checkpoints/sft/<name>/: the HF-loadable causal LM + tokenizer, manifest.json with the
                 budget: samples_scored = rounds * n * k ratings, steps, tokens_trained (select=random
                 consumes the same ratings: the same budget, spent on no selection)

Top-1 of k is distillation of best-of-k: on world=bandit (one prompt, one-token episodes, a noiseless
rater) the trained model's next-token distribution must approach the closed form P(a) = F(≤a)^k − F(<a)^k
(collapse_lab/evaluation/best_of_k.py); the manifest records that distance as `bandit_tv_to_best_of_k`.
A killed run is redone from the start (it takes seconds on the tiny base).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import set_seed

from collapse_lab.core import tracking
from collapse_lab.core.console import note
from collapse_lab.world.bandit import next_token_probs, reward_vector
from collapse_lab.evaluation.best_of_k import best_of_k
from collapse_lab.core.config import ANY, COUNT, NONNEG, POSITIVE, ConfigError, one_of, ranged, run_dir
from collapse_lab.evaluation.frontier import Curve, callbacks
from collapse_lab.models.models import add_lora, load_pretrained
from collapse_lab.stages.ratings import episode_tokens, load_ratings, rate_samples, start_on_ratings
from collapse_lab.models.tokenizer import encode_texts
from collapse_lab.stages.stage import (BASE, RATINGS, SELECTION, Run, Stage, device, hf_args, ratings_budget, save_policy,
                                stage_function)
from collapse_lab.world.world import SCORE_MAX, TableRater, make_world

STAGE = "sft"
SELECT = ("top", "random")  # FeedME, and its finite-sample control


@dataclass
class SFTSection:
    """FeedME: keep the top-rated of each prompt's k rated samples, cross-entropy on them.

    select=random is FeedME's finite-sample CONTROL (recipe sft-random): per prompt, as many of its k
    samples as `top` keeps, drawn uniformly at random (seeded) regardless of score, i.e. SFT on as many
    unselected base samples, from the same ratings (the same rating budget).
    """

    keep_top: int = ranged(1, COUNT)
    min_score: Optional[float] = ranged(None, ANY)  # also require score >= this (e.g. 7: only 7/7 samples)
    select: str = one_of("top", *SELECT)  # top | random (the control: scores ignored, only the count per prompt kept)
    rounds: int = ranged(1, COUNT)  # iterated FeedME: sample from the current model, rate, keep best, again
    epochs: int = ranged(1, POSITIVE)
    lr: float = ranged(1e-4, POSITIVE)
    batch_size: int = ranged(32, COUNT)
    # linear warmup at the start of EVERY round (each round is a fresh Trainer, with a fresh Adam: its first step moves
    # every weight by about lr); 0: none
    warmup_steps: int = ranged(0, NONNEG)
    # along-training evaluations in each round after the first (None: curve.points, as round 1). Round 1 starts at the
    # base, where d ≈ −c·√KL changes fastest and the matched grid begins; later rounds start far from it
    later_round_curve_points: Optional[int] = ranged(None, COUNT)


def sft_dir(cfg: DictConfig, named: bool = True) -> Path:
    s, k = cfg.sft, cfg.ratings.samples_per_prompt
    rounds = f"-r{s.rounds}" if s.rounds > 1 else ""
    return run_dir(cfg, STAGE, REGIME.keys(cfg),
                   f"{cfg.model.name}-{cfg.world.name}-{s.select}{s.keep_top}of{k}{rounds}-s{cfg.seed}", named)


def check(cfg: DictConfig) -> None:
    s = cfg.sft
    if s.keep_top < 1 or s.rounds < 1 or s.epochs <= 0 or s.lr <= 0 or s.batch_size < 1:
        raise ConfigError(f"need sft.keep_top >= 1, sft.rounds >= 1, sft.epochs > 0, sft.lr > 0, sft.batch_size >= 1; "
                          f"got {s.keep_top}, {s.rounds}, {s.epochs}, {s.lr}, {s.batch_size}")
    if s.select not in SELECT:
        raise ConfigError(f"bad value '{s.select}' for 'sft.select'; valid choices: {', '.join(SELECT)}")
    if s.keep_top > cfg.ratings.samples_per_prompt:
        raise ConfigError(f"sft.keep_top={s.keep_top} exceeds the k={cfg.ratings.samples_per_prompt} samples per prompt "
                          "(ratings.samples_per_prompt)")
    if s.min_score is not None:
        top = highest_score(make_world(cfg.world).rater)
        if s.min_score > top:
            raise ConfigError(f"sft.min_score={s.min_score:g} is above the rater's highest score {top:g} "
                              f"(world={cfg.world.name}): no sample could be kept; lower it")


def highest_score(rater) -> float:
    """The most a rating can be: the gold rater's scale top (world.SCORE_MAX), a table's largest entry."""
    if isinstance(rater, TableRater):
        return max([rater.default, *rater.table.values()])
    return float(getattr(rater, "max_score", SCORE_MAX))


def select_top(ratings: Dataset, keep_top: int = 1, min_score=None) -> Dataset:
    """Per prompt draw (prompt_id), the keep_top highest-scored rows, ties to the lower sample_index;
    with min_score, only rows scoring >= min_score (a draw may then keep none)."""
    best: dict[int, list[tuple[float, int, int]]] = {}
    for row, (pid, score, j) in enumerate(zip(ratings["prompt_id"], ratings["score"], ratings["sample_index"])):
        if min_score is None or score >= min_score:
            best.setdefault(pid, []).append((-score, j, row))
    keep = sorted(row for rows in best.values() for _, _, row in sorted(rows)[:keep_top])
    return ratings.select(keep)


def select_random(ratings: Dataset, keep_top: int = 1, min_score=None, seed=0) -> Dataset:
    """The control of select_top: per prompt draw, as many rows as select_top keeps (min(keep_top, #rows
    scoring >= min_score)), drawn uniformly without replacement from ALL its rows, scores ignored;
    numpy's default_rng(seed) over the draws in prompt_id order."""
    rows: dict[int, list[int]] = {}
    for row, pid in enumerate(ratings["prompt_id"]):
        rows.setdefault(pid, []).append(row)
    counts = {pid: 0 for pid in rows}
    for pid in select_top(ratings, keep_top, min_score)["prompt_id"]:
        counts[pid] += 1
    rng = np.random.default_rng(seed)
    keep = sorted(int(x) for pid in sorted(rows) for x in rng.choice(rows[pid], counts[pid], replace=False))
    return ratings.select(keep)


def feedme_dataset(kept: Dataset, tokenizer) -> Dataset:
    """Pre-tokenised rows for SFTTrainer: input_ids = prompt tokens + sampled completion tokens (EOS
    included when it came), completion_mask = 0 on the prompt, 1 on the completion (the loss)."""
    prompt_ids = encode_texts(tokenizer, list(kept["prompt"]))  # as generate() encoded them (BOS if any)
    completion_ids = list(kept["completion_ids"])
    return Dataset.from_dict({
        "input_ids": [p + c for p, c in zip(prompt_ids, completion_ids)],
        "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)],
    })


@stage_function(STAGE, sft_dir, "{steps} steps, {samples_scored} samples scored",
                check=check)
def train_sft(cfg: DictConfig, run: Run) -> None:
    """FeedME on this config's ratings (or find it finished): `train_sft(cfg, named=True)` returns the model's
    directory (stage.stage_function)."""
    ratings_path, base = start_on_ratings(run, cfg)  # round 1's ratings (upstream, found finished): the reward model's too
    kept, final, tokenizer, fields = feedme(cfg, ratings_path, base, run.out)
    extra = {}
    if make_world(cfg.world).reward_table is not None:  # the bandit: FeedME against best-of-k's closed form
        extra = bandit_tv_to_best_of_k(final, base, tokenizer, cfg, kept)
        note(f"bandit: TV(FeedME, best-of-{cfg.ratings.samples_per_prompt}) = {extra['bandit_tv_to_best_of_k']:.4f} "
              f"(its kept samples' own TV, the sampling floor: {extra['bandit_tv_kept_samples_to_best_of_k']:.4f})")
    run.finish(**fields, select=cfg.sft.select, **extra)
    note(f"saved {run.out} ({time.time() - run.started:.1f} s)")


def feedme(cfg: DictConfig, ratings_path: Path, base: str, out: Path):
    """Steps 1-4: every round's ratings, keep, train; the saved model. Returns (the last round's kept rows,
    the final model, its tokenizer, the manifest's budget fields)."""
    from trl import SFTConfig as TRLSFTConfig  # optional heavy dependency: loaded by the stages that train
    from trl import SFTTrainer

    s, r = cfg.sft, cfg.ratings
    world = make_world(cfg.world)
    set_seed(cfg.seed)
    model, tokenizer = load_pretrained(base, cfg.model.dtype)
    if cfg.peft.enabled:
        model = add_lora(model, cfg.peft)
    model.to(device())
    curve = Curve(model, tokenizer, world) or None  # along-training evaluation: the base's side, before training

    samples_scored, steps, tokens_trained, rounds, log = 0, 0, 0, [], []
    for rnd in range(1, s.rounds + 1):
        # 1. ratings: the shared stage, then the current model's own samples
        if rnd == 1:
            ratings = load_ratings(ratings_path)
        else:
            ratings = rate_samples(model, tokenizer, world, r.prompts, r.samples_per_prompt, r.temperature,
                                   episode_tokens(cfg), seed_key=f"sft/{cfg.seed}/{r.seed}/round{rnd}")
            ratings.save_to_disk(str(out / f"ratings-round{rnd}"))
        samples_scored += len(ratings)
        # 2. keep the best of each prompt's k (the control: as many, at random)
        if s.select == "random":
            kept = select_random(ratings, s.keep_top, s.min_score, seed=[cfg.seed, rnd])
        else:
            kept = select_top(ratings, s.keep_top, s.min_score)
        if len(kept) == 0:
            raise ConfigError(f"sft round {rnd}: no sample scored >= sft.min_score={s.min_score}; lower it")
        data = feedme_dataset(kept, tokenizer)
        # 3. cross-entropy on the kept completions' tokens (TRL)
        args = hf_args(TRLSFTConfig, cfg, out, seed=cfg.seed + rnd, lr=s.lr, batch_size=s.batch_size,
                       num_train_epochs=s.epochs, lr_scheduler_type="linear", warmup_steps=s.warmup_steps,
                       completion_only_loss=True, max_length=None, packing=False,
                       logging_steps=max(1, len(data) // s.batch_size // 4))
        points = cfg.curve.points if rnd == 1 or s.later_round_curve_points is None else s.later_round_curve_points
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=callbacks(curve, points, lambda: samples_scored, offset=steps,
                                                 spacing=cfg.curve.spacing, max_gap=cfg.curve.max_gap))
        tracking.quiet(trainer)
        trainer.train()
        model = trainer.model
        completion_tokens = sum(map(sum, list(data["completion_mask"])))
        steps += trainer.state.global_step
        tokens_trained += round(completion_tokens * s.epochs)
        loss = next((x["loss"] for x in reversed(trainer.state.log_history) if "loss" in x), None)
        rounds.append({"round": rnd, "samples_scored": len(ratings), "kept": len(kept),
                       "kept_mean_score": float(torch.tensor(list(kept["score"])).mean()),
                       "ratings_mean_score": float(torch.tensor(list(ratings["score"])).mean()),
                       "steps": trainer.state.global_step, "final_loss": loss})
        log += [{"round": rnd, **x} for x in trainer.state.log_history]
        note(f"sft round {rnd}: kept ({s.select}) {len(kept)} of {len(ratings)} "
              f"(mean score {rounds[-1]['kept_mean_score']:.2f}), {trainer.state.global_step} steps, loss {loss}")

    # 4. save (LoRA merged in: the evaluator loads a plain causal LM)
    final = model.merge_and_unload() if cfg.peft.enabled else model
    save_policy(out, final, tokenizer, log)
    fields = {"samples_scored": samples_scored, "steps": steps, "tokens_trained": tokens_trained, "rounds": rounds}
    return kept, final, tokenizer, fields


@torch.no_grad()
def bandit_tv_to_best_of_k(model, base_path: str, tokenizer, cfg: DictConfig, kept: Dataset) -> dict:
    """TV between the model's full next-token distribution at the bandit prompt and best-of-k of the base's
    (k = ratings.samples_per_prompt, scores from the reward table: collapse_lab/evaluation/best_of_k.py); and the TV of the
    last round's kept samples (their empirical distribution: what SFT can at best reproduce) to it."""
    base, _ = load_pretrained(base_path, cfg.model.dtype)
    pi0 = next_token_probs(base.to(model.device).eval(), tokenizer, cfg.world.prompt).numpy()
    target = best_of_k(pi0, reward_vector(tokenizer, cfg.world, len(pi0)).numpy(), cfg.ratings.samples_per_prompt)
    pi = next_token_probs(model.eval(), tokenizer, cfg.world.prompt).numpy()
    empirical = np.bincount([ids[0] for ids in kept["completion_ids"]], minlength=len(pi)) / len(kept)
    return {"bandit_tv_to_best_of_k": float(0.5 * abs(pi - target).sum()),
            "bandit_tv_kept_samples_to_best_of_k": float(0.5 * abs(empirical - target).sum())}


# the regime's one declaration (collapse_lab/stages/stage.py): the registry names an entry per recipe of kind sft (sft,
# sft-k16, sft-r3, and the control sft-random); its run directory's keys: the ratings', this section, LoRA, curve
REGIME = Stage(STAGE, train_sft, section=STAGE, schema=SFTSection, consumes=(BASE, RATINGS), group=SELECTION,
               rating_budget=lambda cfg: ratings_budget(cfg) * cfg.sft.rounds, check=check)
