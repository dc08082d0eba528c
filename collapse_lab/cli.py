"""`collapse-lab <command> [key=value ...]`: the lab-level commands.

    ablate     the lab's main job, the matched ablation: base -> ratings -> reward model ->
               regimes x seeds -> evaluator -> report, in checkpoints/ablations/<name>/
               (collapse_lab/lab/ablate.py)
    run        the base alone: pretrain the tiny base (if not done yet), then evaluate it
               with the shared evaluator on the seed suite
    pretrain   train/pretrain.py
    evaluate   eval/evaluate.py
    report     collapse-lab report <ablation dir>: regenerate the report from stored results
    observe    the seed post's measurement on several models side by side (real pretrained ones
               included: collapse_lab/evaluation/observe.py, docs/models.md)
    sweep      collapse-lab sweep recipes/sweeps/<file>.yaml: a W&B sweep's grid, run locally
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from collapse_lab.lab import ablate, report, sweep
from collapse_lab.evaluation import evaluator, observe
from collapse_lab.stages import pretrain
from collapse_lab.core.config import ConfigError, check_output, cli, compose, one_line_errors, quiet_libraries
from collapse_lab.stages.stage import flush_denormals


def _run(cfg):
    pretrain.check(cfg)  # the whole plan before any work: the base's config and directory, the evaluator's
    evaluate = compose("evaluate", [f"model_path={ablate._override_value(str(pretrain.base_dir(cfg)))}", "suite=seed"])
    evaluate.model_path = str(pretrain.pretrain(cfg))
    evaluator.run(evaluate)


def _pretrain(cfg):
    return pretrain.pretrain(cfg)


def _evaluate(cfg):
    return evaluator.run(cfg)


def _ablate(argv: list[str]):
    if "--cfg" in argv:
        p = ablate.plan([a for a in argv if a != "--cfg"])
        print(OmegaConf.to_yaml(p.cfg), end="")
        print(f"lab overrides: {' '.join(p.lab)}\nout: {p.out}")
        return None
    return ablate.main(argv)


def _report(argv: list[str]):
    if len(argv) != 1:
        raise ConfigError(f"usage: collapse-lab report <ablation dir>; got {len(argv)} arguments")
    path = Path(argv[0])
    if not (path / "ablation.yaml").is_file() or not (path / "runs.json").is_file():
        raise ConfigError(f"{path} is not a finished ablation directory (needs ablation.yaml and runs.json)")
    check_output(path / "plots", "report directory", is_dir=True)
    result = report.build(path)
    print(result["verdict"]["text"])
    print(f"wrote {path / 'report.md'}, {path / 'report.json'}, {path / 'plots'}/")
    return result


def _sweep(argv: list[str]):
    return sweep.main(argv)


def _observe(argv: list[str]):
    return observe.main(argv)


COMMANDS = {"run": ("lab", _run), "pretrain": ("lab", _pretrain), "evaluate": ("evaluate", _evaluate)}
# Commands that parse their own arguments (ConfigError -> one line, exit 2, as for the others).
OWN_ARGS = {"ablate": _ablate, "report": _report, "sweep": _sweep, "observe": _observe}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and argv[0] not in OWN_ARGS):
        got = f"unknown command '{argv[0]}'" if argv else "no command"
        print(f"error: {got}; valid choices: {', '.join([*COMMANDS, *OWN_ARGS])}", file=sys.stderr)
        sys.exit(2)
    if argv[0] in OWN_ARGS:
        if any(a in ("-h", "--help") for a in argv[1:]):
            print(__doc__)
            return None
        quiet_libraries()
        flush_denormals()  # before anything computes: the stages' worker threads copy it when they start
        with one_line_errors():
            OWN_ARGS[argv[0]](argv[1:])
        return None
    config_name, fn = COMMANDS[argv[0]]
    cli(config_name, fn, argv[1:])


if __name__ == "__main__":
    main()
