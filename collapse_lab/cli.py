"""`collapse-lab <command> [key=value ...]`: the lab-level commands.

    run        the lab's main job on the embedded default: pretrain the tiny base (if not
               done yet), then evaluate it with the shared evaluator on the seed suite
    pretrain   train/pretrain.py
    evaluate   eval/evaluate.py
"""

from __future__ import annotations

import sys

from collapse_lab.config import cli


def _run(cfg):
    from collapse_lab.config import compose
    from collapse_lab.evaluator import run as evaluate
    from collapse_lab.pretrain import pretrain

    base = pretrain(cfg)
    evaluate(compose("evaluate", [f"model_path={base}", "suite=seed"]))


def _pretrain(cfg):
    from collapse_lab.pretrain import pretrain

    return pretrain(cfg)


def _evaluate(cfg):
    from collapse_lab.evaluator import run

    return run(cfg)


COMMANDS = {"run": ("lab", _run), "pretrain": ("lab", _pretrain), "evaluate": ("evaluate", _evaluate)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command '{argv[0]}'" if argv else "no command"
        print(f"error: {got}; valid choices: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    config_name, fn = COMMANDS[argv[0]]
    cli(config_name, fn, argv[1:])


if __name__ == "__main__":
    main()
