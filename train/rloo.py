"""RLOO (collapse_lab/regimes/rloo.py): `python train/rloo.py recipe=<one of its recipes> [key=value ...]`."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("rloo", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
