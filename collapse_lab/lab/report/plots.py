"""The report's figures (matplotlib, Agg), drawn from the stored results: the post's figure per regime,
entropy per regime, |ΔH| against KL with its bound, gold reward against KL, training curves, the frontier."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from collapse_lab.evaluation import matched as matched_lib, metrics
from collapse_lab.evaluation.plots import plot_suite
from collapse_lab.lab.report.records import TRAINING_CURVES, _jsonl, _vocab


def make_plots(ablation: Path, base: dict, by_regime: dict, report: dict) -> list[Path]:
    """Every figure of the report into <ablation>/plots/; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ablation / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = list(report["regimes"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    written = post_figures(ablation, base, by_regime, out)
    written += [entropy_plot(report, base, colors, out, plt), kl_entropy_plot(by_regime, colors, out, plt),
                reward_kl_plot(report, base, colors, out, plt)]
    fr = report.get("frontier") or {}
    if fr.get("curves"):  # d and gold gain against KL along training, with the base's exact reference curves
        written.append(frontier_plot(fr, colors, out / "frontier.png", plt))
    training = training_plot(ablation, report, colors, out, plt)
    return written + ([training] if training else [])


def post_figures(ablation: Path, base: dict, by_regime: dict, out: Path) -> list[Path]:
    """The post's figure per regime: seed-averaged p(a) per seed prompt, the base hatched."""
    written = []
    for name, runs in [("base", [base])] + list(by_regime.items()):
        records = []
        for pid, a in runs[0]["answers"].items():
            probs = np.mean([r["answers"][pid]["probs"] for r in runs], axis=0)
            records.append({"id": pid, "answers": a["answers"], "answer_probs": probs.tolist(),
                            "answer_entropy": float(np.mean([r["per_prompt"][pid]["answer_entropy"] for r in runs])),
                            "max_entropy": a["max_entropy"], "valid_mass": float(probs.sum()),
                            "entropy_upper_bound": metrics.entropy_upper_bound(probs, _vocab(ablation)),
                            **({"reference_answer_probs": base["answers"][pid]["probs"]} if name != "base" else {})})
        path = out / f"post_{name}.png"
        plot_suite(records, f"{name}: p(answer) on the seed prompts (mean over {len(runs)} seed(s)); base hatched", path)
        written.append(path)
    return written


def entropy_plot(report: dict, base: dict, colors: dict, out: Path, plt) -> Path:
    """H/log|A| per regime: seeds as dots, the 95% interval as a bar, the base and the collapse threshold."""
    names = list(report["regimes"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, n in enumerate(names):
        s = report["regimes"][n]["metrics"]["norm_entropy"]
        err = None if s["lo"] is None else [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]
        ax.errorbar([i], [s["mean"]], yerr=err, fmt="o", color=colors[n], capsize=4)
        ax.scatter([i] * len(s["values"]), s["values"], s=8, color=colors[n], alpha=0.5)
    b = base["norm_entropy"]
    thr = report["config"]["ablate"]["collapse"]["threshold"]
    ax.axhline(b, color="k", lw=1, label=f"base {b:.3f}")
    ax.axhline(b - thr, color="r", lw=1, ls="--", label=f"collapse threshold (base - {thr:g})")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("H / log|A| (mean of 5 prompts)")
    ax.set_title("answer entropy per regime (dots: seeds; bars: 95% interval)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / "entropy.png")


def kl_entropy_plot(by_regime: dict, colors: dict, out: Path, plt) -> Path:
    """|ΔH| against KL to the base, a point per prompt and seed, under the Pinsker + Fannes–Audenaert bound."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    kls = [k for runs in by_regime.values() for r in runs for k, _ in r["points"] if k > 0]
    grid = np.logspace(math.log10(max(min(kls, default=1e-4), 1e-6) / 2), math.log10(max(max(kls, default=1.0), 1.0) * 2), 200)
    ax.plot(grid, [metrics.fannes_entropy_bound(metrics.pinsker_tv_bound(k), 101) for k in grid], "k-", lw=1,
            label="Fannes–Audenaert(Pinsker(KL)), d = 101")
    for n, runs in by_regime.items():
        pts = np.array([p for r in runs for p in r["points"]])
        if len(pts):
            ax.scatter(np.maximum(pts[:, 0], 1e-6), pts[:, 1], s=10, color=colors[n], label=n)
    ax.set_xscale("log")
    ax.set_xlabel("KL(p ‖ p_base) on the answers (nats)")
    ax.set_ylabel("|ΔH| (nats)")
    ax.set_title("entropy change vs KL to base (a point per prompt and seed)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, out / "kl_entropy.png")


def reward_kl_plot(report: dict, base: dict, colors: dict, out: Path, plt) -> Path:
    """Gold reward against KL per regime (the over-optimisation frontier)."""
    names = list(report["regimes"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if base.get("gold_reward") is not None:
        ax.scatter([0], [base["gold_reward"]], color="k", marker="s", label="base")
    for n in names:
        m = report["regimes"][n]["metrics"]
        if m["gold_reward"]["mean"] is None:
            continue
        xerr = None if m["kl_to_reference"]["lo"] is None else [[m["kl_to_reference"]["mean"] - m["kl_to_reference"]["lo"]], [m["kl_to_reference"]["hi"] - m["kl_to_reference"]["mean"]]]
        yerr = None if m["gold_reward"]["lo"] is None else [[m["gold_reward"]["mean"] - m["gold_reward"]["lo"]], [m["gold_reward"]["hi"] - m["gold_reward"]["mean"]]]
        ax.errorbar([m["kl_to_reference"]["mean"]], [m["gold_reward"]["mean"]], xerr=xerr, yerr=yerr, fmt="o",
                    color=colors[n], capsize=3, label=n)
    ax.set_xlabel("KL to base on the answers (nats)")
    ax.set_ylabel("mean gold reward (noiseless, ≥ 1)")
    ax.set_title("reward vs KL (over-optimisation frontier)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, out / "reward_kl.png")


def training_plot(ablation: Path, report: dict, colors: dict, out: Path, plt):
    """The training curves every regime logged (TRAINING_CURVES), one panel per key; None when there are none."""
    names = list(report["regimes"])
    curves = {}
    for n in names:
        for seed in report["regimes"][n]["seeds"]:
            rows = _jsonl(ablation / "runs" / n / f"s{seed}" / "metrics.jsonl")
            for key in TRAINING_CURVES:
                pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
                if pts:
                    curves.setdefault(key, []).append((n, seed, pts))
    if curves:
        keys = list(curves)
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, key in zip(axes.flat, keys):
            seen = set()
            for n, seed, pts in curves[key]:
                x, y = zip(*pts)
                ax.plot(x, y, color=colors[n], lw=1, alpha=0.8, label=None if n in seen else n)
                seen.add(n)
            ax.set_title(key, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5)
        return _save(fig, out / "training.png")
    return None


def frontier_plot(fr: dict, colors: dict, path: Path, plt) -> Path:
    """Two panels against KL to the base: Δ(H/log|A|) and the gold gain. Thin lines: one seed's curve along
    training; thick: the mean over seeds of the interpolated curves, with a band of ± one standard error; black
    squares: best-of-k (k labelled); dashed: π*_β."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    refs = fr.get("references") or {}
    for ax, y in zip(axes, ("frontier/delta_norm_entropy", "frontier/gold_gain")):
        for name, per_seed in fr["curves"].items():
            c = colors.get(name, "grey")
            for rows in per_seed.values():
                pts = sorted([(0.0, 0.0)] + [(r["frontier/kl"], r[y]) for r in rows])
                ax.plot(*zip(*pts), color=c, lw=0.6, alpha=0.5)
            x_max = min(max(r["frontier/kl"] for r in rows) for rows in per_seed.values())
            if x_max > 0:
                grid = np.linspace(0, x_max, 30)
                ys = np.array([matched_lib.interpolate(sorted([(0.0, 0.0)] + [(r["frontier/kl"], r[y]) for r in rows]), grid)
                               for rows in per_seed.values()])
                m = ys.mean(0)
                ax.plot(grid, m, color=c, lw=2, label=name)
                if len(ys) > 1:
                    se = ys.std(0, ddof=1) / math.sqrt(len(ys))
                    ax.fill_between(grid, m - se, m + se, color=c, alpha=0.2)
        if refs.get("optimum_beta"):
            pts = sorted((x["frontier/kl"], x[y]) for x in refs["optimum_beta"])
            ax.plot(*zip(*pts), "k--", lw=1, label="π*_β (exact)")
        for x in refs.get("best_of_k", []):
            ax.scatter([x["frontier/kl"]], [x[y]], color="k", marker="s", s=14)
            ax.annotate(f"k={x['k']}", (x["frontier/kl"], x[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("KL to base on the answers (nats)")
        ax.set_ylabel({"frontier/delta_norm_entropy": "Δ(H / log|A|) vs base", "frontier/gold_gain": "gold gain (mean rating)"}[y])
        ax.legend(fontsize=6)
    fig.suptitle("along training, at matched distance (thin: seeds; thick ± s.e.: mean; squares: best-of-k)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
