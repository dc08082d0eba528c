"""The evaluator's figure (the post's bar charts), torch-free: the report draws it from stored results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TOP_K_PLOT = 15  # answers shown per panel


def plot_suite(records: list[dict], title: str, path: Path) -> bool:
    """One PNG, a panel per prompt: the top answers' p(a) (the post's bar charts; reference hatched),
    or an open prompt's category shares. Returns False (nothing written) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in records if "answers" in r or r.get("sampling", {}).get("category_shares")]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, panels):
        ref = None
        if "answers" in r:
            p = np.asarray(r["answer_probs"])
            top = np.argsort(-p)[:TOP_K_PLOT]
            labels, heights = [r["answers"][i] for i in top], p[top]
            if "reference_answer_probs" in r:
                ref = np.asarray(r["reference_answer_probs"])[top]
            ax.set_title(f"{r['id']}\nH = {r['answer_entropy']:.2f} nats (max {r['max_entropy']:.2f}, "
                         f"post's bound {r['entropy_upper_bound']:.2f}), M = {r['valid_mass']:.2f}", fontsize=8)
            ax.set_ylabel("p(answer)")
        else:
            shares = r["sampling"]["category_shares"]
            labels, heights = list(shares), np.array(list(shares.values()))
            ax.set_title(f"{r['id']}\nsequence entropy {r['sampling']['sequence_entropy']:.1f} "
                         f"± {r['sampling']['sequence_entropy_se']:.1f} nats", fontsize=8)
            ax.set_ylabel("share of samples")
        bars = ax.bar(range(len(labels)), heights, color="tab:blue", alpha=0.8, label="model")
        ax.bar_label(bars, labels=[f"{h:.1%}" for h in heights], fontsize=6, rotation=90, padding=2)
        if ref is not None:
            ax.bar(range(len(labels)), ref, fill=False, hatch="//", edgecolor="grey", label="reference")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(labels)), [repr(x)[1:-1] for x in labels], rotation=90, fontsize=7)
        ax.set_ylim(0, min(1.0, 1.25 * max(heights.max(), 0 if ref is None else ref.max(), 1e-3)))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
