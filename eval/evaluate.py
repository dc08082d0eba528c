"""Evaluate a model on a prompt suite: python eval/evaluate.py model_path=PATH [suite=seed] [key=value ...]

Writes <out>.json and <out>.png; fields and formulas: eval/README.md.
"""

from collapse_lab.config import cli
from collapse_lab.evaluator import run

if __name__ == "__main__":
    cli("evaluate", run)
