"""Sample k completions per training prompt from the base and rate each with the gold rater:
`python train/rate.py [ratings.prompts=256 ratings.samples_per_prompt=4 ...]` (the RATING BUDGET)."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("ratings", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
