"""PPO for language models: `accelerate launch train/ppo.py recipe=kl0.1 [key=value ...]`.

The update rule, top to bottom: collapse_lab/regimes/ppo.py.
"""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("ppo", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
