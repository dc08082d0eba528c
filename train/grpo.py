"""GRPO (collapse_lab/regimes/grpo.py): `python train/grpo.py recipe=<one of its recipes> [key=value ...]`."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("grpo", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
