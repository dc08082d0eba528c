"""Pretrain the lab's tiny base on the embedded world: `python train/pretrain.py [key=value ...]`."""

from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
from collapse_lab.core.config import cli
from collapse_lab.stages.pretrain import pretrain


def main(cfg):
    return pretrain(cfg)


if __name__ == "__main__":
    cli("lab", main)
