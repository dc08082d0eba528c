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

from collapse_lab.core.checkpoint import read_manifest
from collapse_lab.core.config import ConfigError
from collapse_lab.stages.reward_model import ModelReward, reward_dir
from collapse_lab.world.world import Prompt


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


def make_reward(cfg, world, device) -> Reward:
    """The configured reward source. `reward=rm` reads a FINISHED reward model: `reward_model_path`, else
    the one this config's ratings train (reward_dir); training it is the orchestrator's job (the
    registry resolves upstream stages: collapse_lab/regimes/registry.py), never a side effect of this factory."""
    if cfg.reward == "gold":
        return GoldReward(world, cfg.seed)
    path = cfg.reward_model_path or str(reward_dir(cfg, named=False))
    if (read_manifest(Path(path)) or {}).get("status") != "finished":
        raise ConfigError(f"reward=rm: no finished reward model at {path}; train it first (train/reward.py with "
                          "the same config; the regimes' entry points and collapse-lab ablate resolve it)")
    return ModelReward(path, device)


def reward_func(reward: Reward, world, eos_token_id: int, missing_eos_penalty: float = 0.0):
    """The lab's reward as a TRL reward function (GRPOTrainer, RLOOTrainer): TRL calls it with the prompt
    texts, the decoded completions, their token ids and the dataset's other columns; a completion ended
    iff its ids end with EOS (TRL cuts after the first EOS), as the rater and the reward model need; one
    cut off loses `missing_eos_penalty`, as in PPO."""

    def score(prompts, completions, completion_ids, **_) -> list[float]:
        ended = [len(ids) > 0 and ids[-1] == eos_token_id for ids in completion_ids]
        scores = reward([world.prompt(p) for p in prompts], completions, ended)
        return (scores - missing_eos_penalty * (~torch.tensor(ended)).float()).tolist()

    score.__name__ = "lab_reward"
    return score
