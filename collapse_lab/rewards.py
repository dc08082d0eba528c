"""One reward interface for every regime: `reward=gold` (the world's rater) or `reward=rm`.

    reward(prompts, completions, ended) -> (B,) float tensor, the score of each completion

`ended[i]` says whether completion i stopped with EOS; the rater scores a cut-off
completion as not ending cleanly, and the reward model sees EOS only when there was one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

import torch

from collapse_lab.tokenizer import encode_texts
from collapse_lab.world import Prompt


class Reward(Protocol):
    def __call__(self, prompts: list[Prompt], completions: list[str], ended: list[bool]) -> torch.Tensor: ...

    def reseed(self, key: str) -> None: ...


class GoldReward:
    """The world's gold rater (noisy, like a human labeller); its RNG state is checkpointed."""

    def __init__(self, world, seed: int):
        self.rater = world.rater
        self.rng = random.Random(f"gold-reward/{seed}")

    def __call__(self, prompts, completions, ended) -> torch.Tensor:
        return torch.tensor([self.rater(p, c, self.rng, bool(e)) for p, c, e in zip(prompts, completions, ended)])

    def reseed(self, key: str) -> None:
        """Rating noise as a function of `key` (seed/process/step): a resumed run rates alike."""
        self.rng.seed(f"gold-reward/{key}")


class ModelReward:
    """A trained reward model (sequence classification, one logit) scoring prompt + completion.

    `samples_scored`: the ratings it was trained on (its manifest's), the budget a policy
    optimising it has spent; querying it is free.
    """

    def __init__(self, path: str, device, dtype=torch.float32, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from collapse_lab.checkpoint import read_manifest
        from collapse_lab.models import distinct_pad, ensure_eos

        self.path = path
        self.samples_scored = (read_manifest(Path(path)) or {}).get("samples_scored")

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        ensure_eos(self.tokenizer, self.model.config, path)
        distinct_pad(self.tokenizer, self.model)  # a model saved with pad = EOS gets one too (collapse_lab/models.py)
        self.model = self.model.to(device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, ended) -> torch.Tensor:
        eos = self.tokenizer.eos_token
        ids = encode_texts(self.tokenizer, [p.text + c + (eos if e else "") for p, c, e in zip(prompts, completions, ended)])
        scores = []
        for i in range(0, len(ids), self.batch_size):
            batch = self.tokenizer.pad({"input_ids": ids[i:i + self.batch_size]}, padding=True,
                                       return_tensors="pt").to(self.model.device)  # right padding
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)

    def reseed(self, key: str) -> None:
        pass  # deterministic


def make_reward(cfg, world, device) -> Reward:
    """The configured reward source; `reward=rm` without `reward_model_path` trains the reward
    model on this config's ratings first (or finds it finished)."""
    if cfg.reward == "gold":
        return GoldReward(world, cfg.seed)
    path = cfg.reward_model_path
    if path is None:
        from collapse_lab.reward_model import train_reward_model

        path = str(train_reward_model(cfg, named=False))
    return ModelReward(path, device)
