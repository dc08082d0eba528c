"""FeedME: fine-tune the base on the top-rated of each prompt's k rated samples:
`python train/sft.py recipe=sft [sft.keep_top=1 sft.min_score=7 sft.rounds=2 ...]`."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("sft", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
