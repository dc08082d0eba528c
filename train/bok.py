"""Best-of-k as a regime (no training): `python train/bok.py [ratings.samples_per_prompt=4]` writes
checkpoints/bok/<name>/bok.json, which `python eval/evaluate.py model_path=checkpoints/bok/<name>` evaluates
exactly (the closed form in collapse_lab/regimes/bok.py)."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import cli


def main(cfg):
    return registry.run("bok", cfg)  # its upstream stages (base, ratings, reward model) first


if __name__ == "__main__":
    cli("lab", main)
