"""Ratings: the RATING BUDGET that FeedME and the reward model share.

    1. prompts  n = ratings.prompts draws of world.train_prompt(rng)  (the regimes' one prompt source)
    2. sample   k = ratings.samples_per_prompt completions of each from the base, full vocabulary,
                at ratings.temperature (1: the base's own distribution), ratings.max_new_tokens
                tokens (world=bandit: ONE token, its episodes' length)
    3. score    each completion ONCE by the world's rater (the gold rater is noisy, like a labeller)
    4. save     checkpoints/ratings/<name>/: the rated samples as a `datasets` Dataset (data/),
                manifest.json with samples_scored = n * k, the budget every regime is matched on

Everything is a function of (base, world, ratings section, seed): the prompt draws, the sampling
(torch's RNG) and the rating noise are seeded from `seed` and `ratings.seed`, so a second run with
the same config finds the finished directory, and a rerun elsewhere gives the same rows.

Columns: prompt (text), prompt_id (which of the n draws: the k samples of one draw share it),
format_id (the world's prompt id, e.g. "seed/integer-qa"), completion (text, EOS removed),
completion_ids (the sampled token ids, EOS included when it came), ended (stopped with EOS),
score (the rating), expected (the rater's noiseless score), sample_index (0..k-1).
"""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from omegaconf import DictConfig

from collapse_lab.core.checkpoint import publish
from collapse_lab.core.console import note
from collapse_lab.core.config import ConfigError, run_dir
from collapse_lab.models.models import autocast, load_pretrained
from collapse_lab.stages.pretrain import resolve_base
from collapse_lab.models.rollout import generate
from collapse_lab.models.tokenizer import encode_texts
from collapse_lab.stages.stage import BASE, RATINGS, Stage, device, ratings_budget, run_stage
from collapse_lab.world.world import make_world

STAGE = "ratings"
GENERATE_BATCH = 512  # sequences per generate() call


def ratings_dir(cfg: DictConfig, named: bool = True) -> Path:
    r = cfg.ratings
    return run_dir(cfg, STAGE, UPSTREAM.keys(cfg), f"{cfg.model.name}-{cfg.world.name}-n{r.prompts}k{r.samples_per_prompt}"
                   f"-s{cfg.seed}", named)


def episode_tokens(cfg: DictConfig) -> int:
    """Tokens per sampled completion: the world's episode for ratings.max_new_tokens (World.episode: the
    bandit's episodes are its own length, whatever the section says)."""
    return make_world(cfg.world).episode(cfg.ratings.max_new_tokens)[0]


def stable_seed(*parts) -> int:
    """A 31-bit seed from any parts (torch.manual_seed takes ints; Python's hash() is salted)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def check(cfg: DictConfig) -> None:
    r = cfg.ratings
    if r.prompts < 1 or r.samples_per_prompt < 1 or r.temperature <= 0 or r.max_new_tokens < 1:
        raise ConfigError(f"need ratings.prompts >= 1, ratings.samples_per_prompt >= 1, ratings.temperature > 0, "
                          f"ratings.max_new_tokens >= 1; got {r.prompts}, {r.samples_per_prompt}, {r.temperature}, "
                          f"{r.max_new_tokens}")


def rate_samples(model, tokenizer, world, n_prompts: int, k: int, temperature: float, max_new_tokens: int,
                 seed_key: str) -> Dataset:
    """n_prompts training prompts x k samples of `model`, each rated once: the rows described above.

    `seed_key` seeds the prompt draws, the sampling and the rating noise (one RNG each).
    """
    prompt_rng, rater_rng = random.Random(f"prompts/{seed_key}"), random.Random(f"rater/{seed_key}")
    prompts = [world.train_prompt(prompt_rng) for _ in range(n_prompts)]
    torch.manual_seed(stable_seed("sample", seed_key))
    # (prompt_id, sample_index), k per draw; sorted by prompt length so a batch's left padding is short
    lengths = list(map(len, encode_texts(tokenizer, [p.text for p in prompts])))
    flat = sorted(((i, j) for i in range(n_prompts) for j in range(k)), key=lambda ij: (lengths[ij[0]], ij))
    was_training = model.training
    model.eval()
    rows = {}
    for start in range(0, len(flat), GENERATE_BATCH):
        chunk = flat[start:start + GENERATE_BATCH]
        rollout = generate(model, tokenizer, [prompts[i].text for i, _ in chunk], max_new_tokens, temperature)
        for (i, j), ids, mask, text, ended in zip(chunk, rollout.responses.tolist(), rollout.response_mask.tolist(),
                                                  rollout.texts, rollout.ended.tolist()):
            p = prompts[i]
            rows[i, j] = {"prompt": p.text, "prompt_id": i, "format_id": p.id, "completion": text,
                          "completion_ids": [t for t, m in zip(ids, mask) if m], "ended": bool(ended),
                          "score": float(world.rater(p, text, rater_rng, bool(ended))),
                          "expected": float(world.rater.expected(p, text, bool(ended))), "sample_index": j}
    model.train(was_training)
    return Dataset.from_list([rows[key] for key in sorted(rows)])


def summary(data: Dataset) -> dict:
    """Score statistics of a ratings dataset (for manifests and the note)."""
    scores = torch.tensor(list(data["score"]))
    return {"mean_score": float(scores.mean()), "top_score_share": float((scores == scores.max()).float().mean()),
            "ended_share": float(torch.tensor(list(data["ended"])).float().mean())}


def load_ratings(path: Path) -> Dataset:
    return load_from_disk(str(Path(path) / "data"))


def rate(cfg: DictConfig, named: bool = True) -> Path:
    """Sample, rate and save (or find finished) this config's ratings; returns their directory."""
    check(cfg)
    out = ratings_dir(cfg, named)
    with run_stage(cfg, out, STAGE, "{samples_scored} samples scored", track=False) as run:
        if run.done:
            return out
        base = resolve_base(cfg)
        run.start(base_path=base)
        world = make_world(cfg.world)
        model, tokenizer = load_pretrained(base, cfg.model.dtype)
        r = cfg.ratings
        with autocast(cfg, device()):
            data = rate_samples(model.to(device()), tokenizer, world, r.prompts, r.samples_per_prompt, r.temperature,
                                episode_tokens(cfg), seed_key=f"ratings/{cfg.seed}/{r.seed}")
        publish(out, lambda tmp: data.save_to_disk(str(tmp / "data")))
        run.finish(samples_scored=len(data), prompts=r.prompts, samples_per_prompt=r.samples_per_prompt,
                   steps=0, tokens_trained=0, **summary(data))
        note(f"saved {out} ({len(data)} rated samples, {time.time() - run.started:.1f} s)")
    return out


def start_on_ratings(run, cfg: DictConfig) -> tuple[Path, str]:
    """The start of every stage that learns from this config's ratings (reward model, FeedME, DPO): the ratings
    (the upstream stage, found finished when the orchestrator resolved it), the base, `run.start` recording both.
    Returns (ratings directory, base path)."""
    ratings_path = rate(cfg, named=False)
    base = resolve_base(cfg)
    run.start(base_path=base, ratings_path=str(ratings_path))
    return ratings_path, base


# the stage's declaration (collapse_lab/stages/stage.py), which the registry collects; its keys: the base, the world, the seed, this section
UPSTREAM = Stage(RATINGS, rate, section="ratings", consumes=(BASE,), produces=RATINGS, rating_budget=ratings_budget,
                 check=check)
