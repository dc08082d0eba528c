"""RLOO (collapse_lab/rloo.py): `python train/rloo.py recipe=<one of its recipes> [key=value ...]`."""

from collapse_lab import registry
from collapse_lab.config import cli


def main(cfg):
    return registry.run("rloo", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
