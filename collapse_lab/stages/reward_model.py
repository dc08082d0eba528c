"""The reward model behind `reward=rm`: learned from the SAME ratings FeedME keeps the best of.

    1. ratings  the ratings stage (collapse_lab/stages/ratings.py); a share reward_model.eval_fraction of the
                distinct prompt TEXTS is held out (every draw of a held-out text)
    2. pairs    within each prompt draw, every two samples with different scores: (chosen, rejected)
    3. train    TRL's RewardTrainer (Bradley-Terry: −log σ(r_chosen − r_rejected)) on a sequence-
                classification head (one logit) initialised from the base
    4. check    on the held-out draws: pairwise accuracy (ties in r count ½) and Spearman's ρ between
                r and the gold score (and the rater's noiseless score), scored through
                ModelReward (below), the very interface PPO uses
    5. save     checkpoints/reward/<name>/: model + tokenizer, manifest.json (samples_scored = the ratings')

Texts are `prompt + completion + EOS-if-it-ended`, tokenised as prompts are (`tokenizer.encode_texts`: a
BOS if the tokenizer adds one, nothing appended): exactly what ModelReward scores (TRL would append EOS to
every text; a cut-off completion must not get one). The reward model's tokenizer gets a pad token distinct
from EOS (`models.distinct_pad`), else the head would read the score before the EOS.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import set_seed

from scipy.stats import spearmanr
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from collapse_lab.core import tracking
from collapse_lab.core.console import note, quiet_logger
from collapse_lab.core.checkpoint import publish, read_manifest
from collapse_lab.core.config import ConfigError, run_dir
from collapse_lab.core.suites import load_suite
from collapse_lab.models.models import DTYPES, distinct_pad, ensure_eos, add_lora
from collapse_lab.stages.ratings import load_ratings, start_on_ratings
from collapse_lab.models.tokenizer import encode_texts
from collapse_lab.stages.stage import (BASE, RATINGS, REWARD_MODEL, Run, Stage, device, hf_args, ratings_budget,
                                       stage_function)
from collapse_lab.world.world import make_world

STAGE = "reward"


def reward_dir(cfg: DictConfig, named: bool = True) -> Path:
    r = cfg.ratings
    return run_dir(cfg, STAGE, UPSTREAM.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-rm-n{r.prompts}k{r.samples_per_prompt}"
                   f"-s{cfg.seed}", named)


def check(cfg: DictConfig) -> None:
    m = cfg.reward_model
    if m.epochs <= 0 or m.lr <= 0 or m.batch_size < 1 or not 0 < m.eval_fraction < 1:
        raise ConfigError(f"need reward_model.epochs > 0, reward_model.lr > 0, reward_model.batch_size >= 1, "
                          f"0 < reward_model.eval_fraction < 1; got {m.epochs}, {m.lr}, {m.batch_size}, {m.eval_fraction}")


def rm_text(prompt: str, completion: str, ended: bool, eos: str) -> str:
    """What the reward model reads (as ModelReward builds it)."""
    return prompt + completion + (eos if ended else "")


def split_prompts(prompt_ids: list[int], eval_fraction: float, seed, texts: list[str] | None = None) -> tuple[set[int], set[int]]:
    """(train, held-out) prompt draws. With `texts` (each row's prompt text, aligned with prompt_ids): the DISTINCT
    texts are split (a seeded shuffle, a share eval_fraction held out, at least one of each) and a draw goes where
    its text goes, so no held-out prompt was trained on under another draw. Without: the draws themselves."""
    if texts is None:
        ids = sorted(set(prompt_ids))
        random.Random(f"rm-split/{seed}").shuffle(ids)
        n_eval = min(len(ids) - 1, max(1, round(eval_fraction * len(ids))))
        return set(ids[n_eval:]), set(ids[:n_eval])
    distinct = sorted(set(texts))
    if len(distinct) < 2:
        raise ConfigError("the reward model's held-out split needs at least two distinct prompt texts in the ratings")
    random.Random(f"rm-split/{seed}").shuffle(distinct)
    n_eval = min(len(distinct) - 1, max(1, round(eval_fraction * len(distinct))))
    held = set(distinct[:n_eval])
    return ({pid for pid, t in zip(prompt_ids, texts) if t not in held},
            {pid for pid, t in zip(prompt_ids, texts) if t in held})


def preference_pairs(ratings: Dataset, prompt_ids: set[int]) -> list[tuple[int, int]]:
    """(chosen row, rejected row) for every two samples of one prompt draw whose scores differ."""
    groups: dict[int, list[int]] = {}
    for row, pid in enumerate(ratings["prompt_id"]):
        if pid in prompt_ids:
            groups.setdefault(pid, []).append(row)
    scores = list(ratings["score"])
    pairs = []
    for rows in groups.values():
        for a in rows:
            for b in rows:
                if scores[a] > scores[b]:
                    pairs.append((a, b))
    return pairs


def pairwise_accuracy(rewards, pairs: list[tuple[int, int]]) -> float:
    """Share of pairs with r(chosen) > r(rejected), a tie counting ½ (chance: 0.5)."""
    r = np.asarray(rewards, dtype=np.float64)
    diff = np.array([r[a] - r[b] for a, b in pairs])
    return float(((diff > 0) + 0.5 * (diff == 0)).mean()) if pairs else float("nan")


@stage_function(STAGE, reward_dir, "held-out accuracy {eval_pairwise_accuracy:.3f}",
                check=check)
def train_reward_model(cfg: DictConfig, run: Run) -> None:
    """Train (or find finished) the reward model on this config's ratings: `train_reward_model(cfg, named=True)`
    returns its directory (stage.stage_function)."""
    ratings_path, base = start_on_ratings(run, cfg)
    ratings = load_ratings(ratings_path)
    metrics = fit_reward_model(cfg, ratings, base, run.out)
    run.finish(samples_scored=len(ratings), **metrics)
    note(f"saved {run.out}: held-out pairwise accuracy {metrics['eval_pairwise_accuracy']:.3f} "
          f"({metrics['eval_pairs']} pairs), Spearman with gold {metrics['eval_spearman_gold']:.3f}, with the "
          f"noiseless score {metrics['eval_spearman_expected']:.3f} ({time.time() - run.started:.1f} s)")


def fit_reward_model(cfg: DictConfig, ratings: Dataset, base: str, out: Path) -> dict:
    """Steps 2-4 on a ratings dataset: train, save model + tokenizer to `out`, return the budget and checks."""
    from trl import RewardConfig, RewardTrainer  # optional heavy dependency: loaded by the stages that train

    m = cfg.reward_model

    # 1-2. held-out prompt texts (all their draws); pairs within a draw
    train_ids, eval_ids = split_prompts(list(ratings["prompt_id"]), m.eval_fraction, cfg.seed, list(ratings["prompt"]))
    train_pairs, eval_pairs = preference_pairs(ratings, train_ids), preference_pairs(ratings, eval_ids)
    if not train_pairs:
        raise ConfigError("the ratings give no training pair (every prompt's samples scored alike); "
                          "raise ratings.prompts or ratings.samples_per_prompt")
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_eos(tokenizer, AutoConfig.from_pretrained(base), base)
    distinct_pad(tokenizer)  # pad != EOS: the score is read at the EOS of an ended completion
    texts = [rm_text(p, c, e, tokenizer.eos_token)
             for p, c, e in zip(ratings["prompt"], ratings["completion"], ratings["ended"])]
    ids = encode_texts(tokenizer, texts)
    data = Dataset.from_dict({"chosen_ids": [ids[a] for a, _ in train_pairs],
                              "rejected_ids": [ids[b] for _, b in train_pairs]})

    # 3. Bradley-Terry on a one-logit head over the base (TRL)
    set_seed(cfg.seed)  # the head is initialised at random
    # its load report (the fresh score head, expected here); transformers checks its tensor-parallel plan, and
    # warns of it, whenever that logger is quieter than INFO: held as well
    with quiet_logger("transformers.modeling_utils", "transformers.distributed.tensor_parallel"):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=DTYPES[cfg.model.dtype])
    distinct_pad(tokenizer, model)
    if cfg.peft.enabled:  # a LoRA adapter on the trunk, the score head in full (a real base's size: no full Adam state)
        model = add_lora(model, cfg.peft, task_type="SEQ_CLS")
    args = hf_args(RewardConfig, cfg, out, seed=cfg.seed, lr=m.lr, batch_size=m.batch_size, num_train_epochs=m.epochs,
                   lr_scheduler_type="linear", max_length=None, logging_steps=max(1, len(data) // m.batch_size // 4))
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    tracking.quiet(trainer)
    trainer.train()

    def save(tmp: Path) -> None:
        if cfg.peft.enabled:  # merged: the directory loads as a plain classifier (ModelReward)
            trainer.model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        else:
            trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is config.yaml

    publish(out, save)
    shutil.rmtree(out / "trainer", ignore_errors=True)

    # 4. held-out checks, through the interface PPO uses
    world = make_world(cfg.world)
    held = [i for i, pid in enumerate(ratings["prompt_id"]) if pid in eval_ids]
    reward = ModelReward(str(out), device())
    prompts = [world.prompt(t) for t in ratings["prompt"]]
    completions, ended = list(ratings["completion"]), list(ratings["ended"])
    scores = reward([prompts[i] for i in held], [completions[i] for i in held], [ended[i] for i in held]).numpy()
    rm = np.full(len(ratings), np.nan)
    rm[held] = scores
    gold, expected = np.array(ratings["score"])[held], np.array(ratings["expected"])[held]
    metrics = {
        "eval_pairs": len(eval_pairs), "train_pairs": len(train_pairs),
        "eval_pairwise_accuracy": pairwise_accuracy(rm, eval_pairs),
        "train_pairwise_accuracy": _train_accuracy(trainer),
        "eval_spearman_gold": _spearman(scores, gold),
        "eval_spearman_expected": _spearman(scores, expected),
    }
    pair_tokens = sum(map(len, data["chosen_ids"])) + sum(map(len, data["rejected_ids"]))
    return {"steps": trainer.state.global_step, "tokens_trained": round(pair_tokens * m.epochs), **metrics}


def _spearman(x, y) -> float:
    """Spearman's rho; NaN (no warning) when either side is constant."""
    return float(spearmanr(x, y).statistic) if np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")


def _train_accuracy(trainer) -> float:
    """The last logged training accuracy (TRL logs it per logging step)."""
    return next((x["accuracy"] for x in reversed(trainer.state.log_history) if "accuracy" in x), float("nan"))


class ModelReward:
    """A trained reward model (sequence classification, one logit) scoring prompt + completion: the
    `reward=rm` side of collapse_lab.stages.rewards' interface.

    `samples_scored`: the ratings it was trained on (its manifest's), the budget a policy
    optimising it has spent; querying it is free.
    """

    def __init__(self, path: str, device, dtype=torch.float32, batch_size: int = 64):
        self.path = path
        self.samples_scored = (read_manifest(Path(path)) or {}).get("samples_scored")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        ensure_eos(self.tokenizer, self.model.config, path)
        distinct_pad(self.tokenizer, self.model)  # a model saved with pad = EOS gets one too (collapse_lab/models/models.py)
        self.model = self.model.to(device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, ended) -> torch.Tensor:
        eos = self.tokenizer.eos_token
        ids = encode_texts(self.tokenizer, [rm_text(p.text, c, e, eos) for p, c, e in zip(prompts, completions, ended)])
        scores = []
        for i in range(0, len(ids), self.batch_size):
            batch = self.tokenizer.pad({"input_ids": ids[i:i + self.batch_size]}, padding=True,
                                       return_tensors="pt").to(self.model.device)  # right padding
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)

    def reseed(self, key: str) -> None:
        pass  # deterministic


# the stage's declaration (collapse_lab/stages/stage.py), which the registry collects: its keys are the ratings' and this section
UPSTREAM = Stage(REWARD_MODEL, train_reward_model, section="reward_model", consumes=(BASE, RATINGS),
                 produces=REWARD_MODEL, rating_budget=ratings_budget, check=check)


def reward_model_answer_scores(reward_model_path: str, world, suite: str = "seed") -> dict:
    """The reward model's score of every answer of the suite's prompts, ended with EOS (clean) and not (other):
    {prompts: [{id, clean, other}]}. Its exact π*_β ∝ π0·e^{r_RM/β} is what a reward=rm regime optimises
    (reference_curves.optimum on these scores); a constant shift (PPO's center_scores) changes nothing."""
    reward = ModelReward(reward_model_path, torch.device("cpu"))
    out = []
    for p in load_suite(suite).prompts:
        if p.answers is None or p.text not in getattr(world, "by_text", {}):
            continue
        prompt = world.prompt(p.text)
        n = len(p.answers)
        scores = reward([prompt] * 2 * n, list(p.answers) * 2, [True] * n + [False] * n).double().numpy()
        out.append({"id": p.id, "clean": scores[:n].tolist(), "other": scores[n:].tolist()})
    return {"prompts": out}
