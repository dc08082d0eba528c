"""DPO and IPO (offline preference methods): the policy learns from pairs of the SAME ratings FeedME keeps
the best of, with no reward model and no sampling during training (Rafailov et al. 2023; Azar et al. 2023).

    1. ratings  the ratings stage (collapse_lab/stages/ratings.py): k rated base samples per prompt draw
    2. pairs    per prompt draw, its top-rated sample (chosen; ties: the lowest sample index, as FeedME)
                against its bottom-rated one (rejected; ties: the highest index); a draw whose k samples
                all score alike gives no pair (dropped, counted in the manifest)
    3. train    TRL's DPOTrainer from the base, the frozen base as the reference, on the pairs' token
                ids exactly as sampled (EOS only where the sample ended: TRL's own preprocessing would
                append one to every completion, so the rows arrive tokenised), loss per dpo.loss_type:
                  sigmoid (DPO)  −log σ(β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)])
                  ipo            ((h(y_w) − h(y_l)) − 1/(2β))², h the per-token mean log-ratio (TRL's IPO)
    4. save     checkpoints/dpo/<name>/: the HF causal LM + tokenizer, manifest.json with the budget:
                samples_scored = n·k (every rating the pairs were chosen from: FeedME's budget), pairs,
                ties_dropped, steps, tokens_trained

Optimum: with Bradley–Terry preferences P(a ≻ b) = σ(r(a) − r(b)) over every pair of answers, DPO's
population optimum is π*(a) ∝ π0(a)·e^{r(a)/β}, the KL-regularised RL optimum (tests/test_closed_forms.py
checks it on a reward table). IPO's regresses each pair's log-ratio gap to 1/(2β) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig
from transformers import set_seed

from collapse_lab.core import tracking
from collapse_lab.core.console import note
from collapse_lab.core.config import COUNT, POSITIVE, ConfigError, one_of, ranged, run_dir
from collapse_lab.evaluation.frontier import Curve, callbacks
from collapse_lab.models.models import add_lora, load_pretrained
from collapse_lab.stages.ratings import load_ratings, start_on_ratings
from collapse_lab.stages.stage import (BASE, OFFLINE, RATINGS, Run, Stage, device, hf_args, ratings_budget, save_policy,
                                stage_function)
from collapse_lab.world.world import make_world

STAGE = "dpo"


@dataclass
class DPOSection:
    """`dpo.*`: β (the KL coefficient of the implied objective; IPO's τ), the loss, the optimiser."""

    beta: float = ranged(0.1, POSITIVE)
    loss_type: str = one_of("sigmoid", "sigmoid", "ipo")  # sigmoid (DPO) | ipo
    epochs: float = ranged(3.0, POSITIVE)
    lr: float = ranged(1e-4, POSITIVE)
    batch_size: int = ranged(32, COUNT)  # pairs per step


def dpo_dir(cfg: DictConfig, named: bool = True) -> Path:
    d = cfg.dpo
    kind = "ipo" if d.loss_type == "ipo" else "dpo"
    return run_dir(cfg, STAGE, REGIME.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-{kind}{d.beta:g}-s{cfg.seed}", named)


def preference_pairs(ratings: Dataset) -> tuple[list[tuple[int, int]], int]:
    """([(chosen row, rejected row)], ties dropped): per prompt draw its top-rated vs its bottom-rated sample."""
    rows: dict[int, list[tuple[float, int, int]]] = {}
    for row, (pid, score, j) in enumerate(zip(ratings["prompt_id"], ratings["score"], ratings["sample_index"])):
        rows.setdefault(pid, []).append((score, j, row))
    pairs, ties = [], 0
    for pid in sorted(rows):
        top = min(rows[pid], key=lambda x: (-x[0], x[1]))
        bottom = min(rows[pid], key=lambda x: (x[0], -x[1]))
        if top[0] == bottom[0]:
            ties += 1
        else:
            pairs.append((top[2], bottom[2]))
    return pairs, ties


def pair_dataset(ratings: Dataset, pairs: list[tuple[int, int]], tokenizer) -> Dataset:
    """DPOTrainer's tokenised rows: prompt_ids (as generate() encoded the prompt), chosen_ids and
    rejected_ids (the sampled completion tokens, EOS included when it came)."""
    prompt_ids = tokenizer([ratings[a]["prompt"] for a, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = ratings["completion_ids"]
    return Dataset.from_dict({"prompt_ids": prompt_ids, "chosen_ids": [completions[a] for a, _ in pairs],
                              "rejected_ids": [completions[b] for _, b in pairs]})


def tokenised_dpo_trainer():
    """TRL's DPOTrainer on rows that arrive tokenised (prompt_ids, chosen_ids, rejected_ids: pair_dataset)."""
    from trl import DPOTrainer  # optional heavy dependency: loaded by the stages that train

    class TokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    return TokenisedDPOTrainer


@stage_function(STAGE, dpo_dir, "{steps} steps, {pairs} pairs, {samples_scored} samples scored")
def train_dpo(cfg: DictConfig, run: Run) -> None:
    """DPO (or IPO) on this config's ratings (or find it finished): `train_dpo(cfg, named=True)` returns the model's
    directory (stage.stage_function)."""
    from trl import DPOConfig  # optional heavy dependency: loaded by the stages that train

    d = cfg.dpo
    ratings_path, base = start_on_ratings(run, cfg)
    ratings = load_ratings(ratings_path)
    # 1-2. pairs: top vs bottom of each prompt draw's k samples
    pairs, ties = preference_pairs(ratings)
    if not pairs:
        raise ConfigError("dpo: every prompt's samples scored alike (no pair); raise ratings.samples_per_prompt")
    set_seed(cfg.seed)
    model, tokenizer = load_pretrained(base, cfg.model.dtype)
    if cfg.peft.enabled:
        model = add_lora(model, cfg.peft)  # the reference: the same model with the adapter disabled
    ref = None if cfg.peft.enabled else load_pretrained(base, cfg.model.dtype)[0]
    data = pair_dataset(ratings, pairs, tokenizer)
    # 3. the pairwise loss against the frozen base (TRL)
    args = hf_args(DPOConfig, cfg, run.out, seed=cfg.seed, lr=d.lr, batch_size=d.batch_size, num_train_epochs=d.epochs,
                   lr_scheduler_type="linear", warmup_steps=0, beta=d.beta, loss_type=[d.loss_type],
                   max_length=None, logging_steps=max(1, len(data) // d.batch_size // 4))
    model.to(device())
    curve = Curve(model, tokenizer, make_world(cfg.world)) or None  # the base's side, before training
    trainer = tokenised_dpo_trainer()(model=model, ref_model=ref, args=args, train_dataset=data,
                                      processing_class=tokenizer,
                                      callbacks=callbacks(curve, cfg.curve.points, lambda: len(ratings), spacing=cfg.curve.spacing,
                                                          max_gap=cfg.curve.max_gap))
    tracking.quiet(trainer)
    trainer.train()
    log = list(trainer.state.log_history)
    # 4. save (LoRA merged in: the evaluator loads a plain causal LM)
    save_policy(run.out, trainer.model.merge_and_unload() if cfg.peft.enabled else trainer.model, tokenizer, log)
    tokens = sum(map(len, data["chosen_ids"])) + sum(map(len, data["rejected_ids"]))
    run.finish(samples_scored=len(ratings), pairs=len(pairs), ties_dropped=ties, steps=trainer.state.global_step,
               tokens_trained=round(tokens * d.epochs), beta=d.beta, loss_type=d.loss_type,
               final_loss=next((x["loss"] for x in reversed(log) if "loss" in x), None))
    note(f"saved {run.out}: {d.loss_type} β={d.beta:g} on {len(pairs)} pairs ({ties} prompt draws tied), "
          f"{trainer.state.global_step} steps")


# the regime's one declaration (collapse_lab/stages/stage.py): the registry names an entry per recipe of kind dpo
# (dpo0.1, dpo0.5, ipo0.1); its run directory's keys: the ratings', this section, LoRA, curve
REGIME = Stage(STAGE, train_dpo, section=STAGE, schema=DPOSection, consumes=(BASE, RATINGS), group=OFFLINE,
               rating_budget=ratings_budget, kl_key="dpo.beta")
