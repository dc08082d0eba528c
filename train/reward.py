"""Train the reward model on the ratings (TRL RewardTrainer): `python train/reward.py [reward_model.epochs=2 ...]`.
`reward=rm` regimes resolve it first (collapse_lab/regimes/registry.py) when reward_model_path is not given."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("reward_model", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
