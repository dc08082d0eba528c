"""`collapse-lab sweep recipes/sweeps/<file>.yaml [key=value ...]`: a W&B sweep's grid, run locally.

The same file serves both ways:
- online:  `wandb sweep recipes/sweeps/beta.yaml`, then `wandb agent <id>`: each agent run is the
           file's `command`, i.e. `collapse-lab ablate <the point's key=value ...>`;
- offline: this runner expands the grid (`method: grid`; `value` fixed, `values` swept), runs
           every point as an ablation (W&B offline, every run in ONE group named after the sweep,
           so `wandb sync --sync-all` shows the comparison), then writes one comparison report
           across the grid: checkpoints/sweeps/<sweep name>/report.md, report.json, plots/*.png.

Extra `key=value` on the command line apply to every point (after the file's parameters).
Every point is validated (ablate.plan) before the first one runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any


from collapse_lab.lab import ablate, replication
from collapse_lab.core.config import ConfigError, check_name, check_output, read_record
from collapse_lab.lab.report.markdown import _fmt, _row
from collapse_lab.core.suites import read_yaml

SWEEP_KEYS = {"program", "name", "method", "metric", "parameters", "command", "description", "project", "entity"}


def load(path: Path) -> dict:
    """The sweep file, checked: a grid over `parameters` with a value or a list of values each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    spec = read_yaml(path, ConfigError)
    if not isinstance(spec, dict) or not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise ConfigError(f"{path}: a sweep needs a non-empty 'parameters' mapping")
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    for key in ("name", "description"):  # `description:` with nothing after it is null: no description
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ConfigError(f"{path}: '{key}' must be text, got {type(spec[key]).__name__}")
    spec["description"] = spec.get("description") or ""
    if spec.get("method") != "grid":
        raise ConfigError(f"{path}: method '{spec.get('method')}': the local runner runs grids; valid choices: grid")
    for key, p in spec["parameters"].items():
        if not isinstance(p, dict) or len(set(p) & {"value", "values"}) != 1:
            raise ConfigError(f"{path}: parameters.{key} needs exactly one of 'value' or 'values'")
        if "values" in p and (not isinstance(p["values"], list) or not p["values"]):
            raise ConfigError(f"{path}: parameters.{key}.values must be a non-empty list")
    return spec


def grid(spec: dict) -> list[dict[str, Any]]:
    """Every point of the grid, in file order: {key: value}."""
    keys = list(spec["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] for p in spec["parameters"].values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def swept(spec: dict) -> list[str]:
    return [k for k, p in spec["parameters"].items() if "values" in p]


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{key}={value}"


def point_overrides(spec: dict, point: dict, extra: list[str]) -> list[str]:
    """A point's ablation: its parameters, W&B offline (or $WANDB_MODE) in the sweep's group, then `extra`
    (the command line's, which win)."""
    name = spec.get("name") or "sweep"
    env = os.environ.get("WANDB_MODE") or "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(env, env)
    return ([_override(k, v) for k, v in point.items()]
            + [f"wandb.mode={mode}", f"wandb.group={name}", *extra])


def main(argv: list[str]) -> Path:
    if not argv:
        raise ConfigError("usage: collapse-lab sweep recipes/sweeps/<file>.yaml [key=value ...]")
    spec = load(Path(argv[0]))
    name = spec.get("name") or Path(argv[0]).stem
    check_name(name, "sweep name")
    spec["name"] = name
    points = grid(spec)
    plans = [ablate.plan(point_overrides(spec, pt, argv[1:])) for pt in points]  # all valid before any runs
    check_output(Path(plans[0].cfg.checkpoints_dir) / "sweeps" / name, "sweep output", is_dir=True)
    outs = []
    for i, (pt, p) in enumerate(zip(points, plans)):
        print(f"sweep {name}: point {i + 1}/{len(points)}: {' '.join(_override(k, pt[k]) for k in swept(spec))}")
        outs.append(ablate.run(p))
    out = Path(plans[0].cfg.checkpoints_dir) / "sweeps" / name
    compare(out, spec, points, outs)
    print(f"sweep {name}: comparison in {out / 'report.md'}")
    return out


COLUMNS = [("norm_entropy", "H/log|A|", ".3f"), ("delta_norm_entropy", "Δ vs base", "+.3f"),
           ("kl_to_reference", "KL to base", ".4f"), ("gold_reward", "gold reward", ".2f"),
           ("top_prob", "top p(a)", ".3f")]


def compare(out: Path, spec: dict, points: list[dict], ablations: list[Path]) -> dict:
    """One report across the grid: per point and regime, the ablation report's key numbers; when `pretrain.seed` is
    swept, also the primary pair's call per base and the bases as a sample (replication.markdown)."""

    out.mkdir(parents=True, exist_ok=True)
    keys = swept(spec)
    rows, reports = [], []
    for pt, abl in zip(points, ablations):
        rep = read_record(Path(abl) / "report.json", f"repair: collapse-lab report {abl}")
        reports.append(rep)
        listed = list(rep["config"]["ablate"]["regimes"])  # the ablation's order (report.json sorts keys)
        for regime in listed + [n for n in rep["regimes"] if n not in listed]:  # + controls it added
            r = rep["regimes"][regime]
            call = (f"control of {r['control_of']}" if r.get("control_of") else
                    r.get("call") or ("collapsed" if r["collapsed"] else "not collapsed"))
            matched = next((c for c in (rep.get("frontier") or {}).get("comparisons", [])
                            if c["regime"] == regime and c["x"] == "kl"), None)  # vs FeedME at matched KL
            rows.append({"point": {k: pt[k] for k in keys}, "ablation": str(abl), "regime": regime,
                         "collapsed": r["collapsed"], "call": call, **{k: r["metrics"][k] for k, _, _ in COLUMNS},
                         "rm_accuracy": (rep.get("reward_model") or {}).get("eval_pairwise_accuracy"),  # an interval
                         "matched_kl": None if matched is None else {**matched["difference"], "call": matched["call"]},
                         "verdict": rep["verdict"]["answer"], "endpoint_verdict": rep["verdict"].get("endpoint_answer")})
    result = {"sweep": spec["name"], "swept": keys, "spec": spec, "rows": rows}
    bases = common = None
    if "pretrain.seed" in keys:  # a sweep over bases: the primary pair's call per base and across them, also on
        bases = [replication.base_row(rep) for rep in reports]  # the one KL range every base reaches
        common = replication.on_common_range(reports)
        result["bases"], result["across_bases"] = bases, replication.across_bases(bases)
        if common is not None:
            result["common_range"] = {**common, "across_bases": replication.across_bases(common["rows"])}
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = [f"# Sweep `{spec['name']}`", "", spec.get("description", "").strip(), "",
          f"Swept: {', '.join(keys)}; each point is an ablation (`collapse-lab ablate`) whose report is linked.", "",
          _row([*keys, "regime", "collapsed", *[label for _, label, _ in COLUMNS], "RM held-out accuracy",
                "vs FeedME at matched KL", "ablation"]),
          _row(["---"] * (len(keys) + 5 + len(COLUMNS)))]
    for r in rows:
        m = r["matched_kl"]
        md.append(_row([*[str(r["point"][k]) for k in keys], r["regime"], "**yes**" if r["collapsed"] else r["call"],
                        *[_fmt(r[k], f) for k, _, f in COLUMNS], _fmt(r["rm_accuracy"], ".3f"),
                        "-" if m is None else f"{_fmt(m, '+.3f')} ({m['call']})",
                        f"[report]({Path(r['ablation']) / 'report.md'})"]))
    if bases is not None:
        md += ["", "## The primary pair per base, and across bases (collapse_lab/lab/replication.py)", "",
               replication.markdown(bases, common=common).rstrip("\n"), "",
               f"![bases.png](plots/{replication.forest_plot(bases, out / 'plots' / 'bases.png', common).name})"]
    plot = _plot(out, keys, rows)
    if plot:
        md += ["", f"![{plot.name}](plots/{plot.name})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return result


def _plot(out: Path, keys: list[str], rows: list[dict]):
    """Normalised answer entropy and gold reward against the (first) swept parameter, per regime."""
    if not keys or not all(isinstance(r["point"][keys[0]], (int, float)) for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    line = lambda r: " ".join([r["regime"], *(f"{k}={r['point'][k]}" for k in keys[1:])])  # noqa: E731
    for label in dict.fromkeys(map(line, rows)):
        pts = sorted(((r["point"][keys[0]], r) for r in rows if line(r) == label), key=lambda x: x[0])
        x = [p for p, _ in pts]
        for ax, key in zip(axes, ("norm_entropy", "gold_reward")):
            ax.plot(x, [r[key]["mean"] if r[key]["mean"] is not None else math.nan for _, r in pts], "o-", label=label)
    symlog = any(v <= 0 for v in (r["point"][keys[0]] for r in rows))
    for ax, label in zip(axes, ("H / log|A| (seed prompts)", "mean gold reward")):
        ax.set_xscale("symlog", linthresh=1e-3) if symlog else ax.set_xscale("log")
        ax.set_xlabel(keys[0])
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "plots" / "sweep.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
