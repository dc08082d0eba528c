"""Pretrain the lab's tiny base on the embedded world: `python train/pretrain.py [key=value ...]`."""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.pretrain import pretrain  # torch/transformers load only once the config is valid

    return pretrain(cfg)


if __name__ == "__main__":
    cli("lab", main)
