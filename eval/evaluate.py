"""Evaluate a model on a prompt suite: python eval/evaluate.py model_path=PATH [suite=seed] [key=value ...]

Writes <out>.json and <out>.png; fields and formulas: eval/README.md.
"""

from collapse_lab.core.config import cli


def main(cfg):
    from collapse_lab.evaluation.evaluator import run  # torch/transformers load only once the config is valid

    return run(cfg)


if __name__ == "__main__":
    cli("evaluate", main)
