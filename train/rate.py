"""Sample k completions per training prompt from the base and rate each with the gold rater:
`python train/rate.py [ratings.prompts=256 ratings.samples_per_prompt=4 ...]` (the RATING BUDGET)."""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.ratings import rate  # torch/transformers load only once the config is valid

    return rate(cfg)


if __name__ == "__main__":
    cli("lab", main)
