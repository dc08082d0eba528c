"""FeedME: fine-tune the base on the top-rated of each prompt's k rated samples:
`python train/sft.py recipe=sft [sft.keep_top=1 sft.min_score=7 sft.rounds=2 ...]`."""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.sft import train_sft  # torch/transformers load only once the config is valid

    return train_sft(cfg)


if __name__ == "__main__":
    cli("lab", main)
