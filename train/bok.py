"""Best-of-k as a regime (no training): `python train/bok.py [ratings.samples_per_prompt=4]` writes
checkpoints/bok/<name>/bok.json, which `python eval/evaluate.py model_path=checkpoints/bok/<name>` evaluates
exactly (the closed form in collapse_lab/bok.py)."""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.bok import make_bok  # torch/transformers load only once the config is valid

    return make_bok(cfg)


if __name__ == "__main__":
    cli("lab", main)
