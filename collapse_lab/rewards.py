"""One reward interface for every regime: `reward=gold` (the world's rater) or `reward=rm`.

    reward(prompts, completions, ended) -> (B,) float tensor, the score of each completion

`ended[i]` says whether completion i stopped with EOS; the rater scores a cut-off
completion as not ending cleanly, and the reward model sees EOS only when there was one.
"""

from __future__ import annotations

import random
from typing import Protocol

import torch

from collapse_lab.world import Prompt


class Reward(Protocol):
    def __call__(self, prompts: list[Prompt], completions: list[str], ended: list[bool]) -> torch.Tensor: ...


class GoldReward:
    """The world's gold rater (noisy, like a human labeller); its RNG state is checkpointed."""

    def __init__(self, world, seed: int):
        self.rater = world.rater
        self.rng = random.Random(f"gold-reward/{seed}")

    def __call__(self, prompts, completions, ended) -> torch.Tensor:
        return torch.tensor([self.rater(p, c, self.rng, bool(e)) for p, c, e in zip(prompts, completions, ended)])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(_tuples(state["rng"]))


class ModelReward:
    """A trained reward model (sequence classification, one logit) scoring prompt + completion."""

    def __init__(self, path: str, device, dtype=torch.float32, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, ended) -> torch.Tensor:
        eos = self.tokenizer.eos_token
        texts = [p.text + c + (eos if e else "") for p, c, e in zip(prompts, completions, ended)]
        scores = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


def _tuples(x):
    """random.Random state after a JSON/YAML round trip: lists back to tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
