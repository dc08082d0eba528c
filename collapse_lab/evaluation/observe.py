"""`collapse-lab observe`: the seed post's OBSERVATIONAL measurement, on several models side by side.

The post compared davinci, text-davinci-002 and text-davinci-003 on five number prompts: each model's
probabilities of " 0" .. " 100", their entropy, and an uncertainty bar (the most the entropy could be if
the mass the API did not show were uniform over the other tokens). This does the same with the lab's exact
evaluator (collapse_lab/evaluation/evaluator.py: answer_distribution) on any models: real pretrained ones
(model presets such as gemma3-270m, smollm2-135m-instruct; collapse_lab/models/real_models.py), the lab's own
base and regimes (run directories), or any directory / .gguf file. Per model and prompt:

    p(a)           exact, every answer of the prompt's set (multi-token answers included: " 42" = ' ','4','2')
    M = Σ_a p(a)   valid mass: the share of continuations that are exactly one answer
    H(q)/log|A|    entropy of q = p/M, as a share of the uniform distribution's
    [L, B]         the post's bar: L = −Σ_a p(a) log p(a) (the answers' own part of the entropy) and the
                   uncertainty bar B = L − (1 − M)·log((1 − M)/(V − |A|)) (metrics.entropy_upper_bound)
    H_next         the full next-token entropy right after the prompt (nats, all V tokens)

and between every two models, per prompt, KL(q_i ‖ q_j) and TV(q_i, q_j) of the normalised answer
distributions. Writes observe.json (everything, full distributions), observe.md (the table) and
observe.png (the post's figure), plus answers-<model>.png (each model's top answers per prompt).

    collapse-lab observe models=[gemma3-270m,smollm2-135m-instruct] out=docs/results/observe
    collapse-lab observe models=[gemma3-270m,checkpoints/base/base-1234abcd] labels=[gemma,lab-base]
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from collapse_lab.evaluation import metrics
from collapse_lab.core.config import ConfigError, check_output, group_options, RECIPES_DIR
from collapse_lab.evaluation.evaluator import answer_distribution
from collapse_lab.evaluation.plots import plot_suite
from collapse_lab.models.models import DTYPES, load_pretrained
from collapse_lab.models.real_models import hub_offline, is_real
from collapse_lab.core.suites import SuiteError, load_suite

TOP = 8  # answers listed per model and prompt in the table


@dataclass
class ObserveConfig:
    # model presets (recipes/model/<name>.yaml with a path: gemma3-270m, smollm2-135m-instruct, ...),
    # run or model directories, .gguf files or hub names
    models: list[str] = field(default_factory=lambda: ["gemma3-270m", "smollm2-135m-instruct"])
    labels: Optional[list[str]] = None  # a short name per model (default: the preset's name or the directory's)
    suite: str = "seed"  # eval/suites/<suite>.yaml: prompts with an answer set
    out: str = "checkpoints/observe"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 128  # trie leaves per forward where tree attention is not used


def parse(argv: list[str]) -> ObserveConfig:
    """key=value overrides on ObserveConfig; ConfigError (one line) for an unknown key or bad value."""
    base = OmegaConf.structured(ObserveConfig)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad observe override ({' '.join(str(e).split())[:200]}); valid keys: "
                          f"{', '.join(base.keys())}") from None
    cfg = OmegaConf.to_object(cfg)
    if not cfg.models:
        raise ConfigError("models is empty; give models=[<preset or path>,...]")
    if cfg.labels is not None and len(cfg.labels) != len(cfg.models):
        raise ConfigError(f"labels has {len(cfg.labels)} entries for {len(cfg.models)} models")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"bad dtype '{cfg.dtype}'; valid choices: {', '.join(DTYPES)}")
    if cfg.device not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"bad device '{cfg.device}'; valid choices: cpu, cuda, mps")
    return cfg


def model_path(spec: str) -> str:
    """A model preset's path (recipes/model/<spec>.yaml), else `spec` itself; ConfigError for a preset
    without one (the lab's `tiny` is pretrained first: give its run directory)."""
    if spec in group_options("model"):
        path = OmegaConf.load(RECIPES_DIR / "model" / f"{spec}.yaml").get("path")
        if path is None:
            raise ConfigError(f"model preset '{spec}' has no weights of its own (it is pretrained by the lab): "
                              "give its run directory, e.g. checkpoints/base/<run>")
        return str(path)
    if not (is_real(spec) or Path(spec).exists()):
        raise ConfigError(f"model '{spec}' is neither a model preset ({', '.join(group_options('model'))}) "
                          "nor an existing directory or .gguf file")
    return spec


def observe_model(model, tokenizer, prompts) -> list[dict]:
    """One record per prompt: the exact answer distribution and the post's numbers (module docstring)."""
    out = []
    for prompt in prompts:
        d = answer_distribution(model, tokenizer, prompt.text, prompt.answers, prompt.continue_chars)
        p, q = d.probs, d.normalised
        order = np.argsort(-p)
        out.append({
            "id": prompt.id, "answers": prompt.answers, "answer_probs": p.tolist(),
            "top": [[prompt.answers[i], float(p[i])] for i in order[:TOP]],
            "valid_mass": float(p.sum()), "answer_entropy": metrics.entropy(q),
            "normalised_entropy": metrics.entropy(q) / math.log(len(p)),
            "known_entropy": metrics.entropy(p),  # L: the answers' part, unnormalised p
            "entropy_upper_bound": metrics.entropy_upper_bound(p, d.vocab_size),  # B
            "next_token_entropy": d.next_token_entropy, "vocab_size": d.vocab_size,
        })
    return out


def pairwise(results: dict[str, list[dict]]) -> list[dict]:
    """KL(q_i ‖ q_j) and TV(q_i, q_j) per prompt for every ordered pair of models (nats; normalised answers)."""
    rows = []
    for a, ra in results.items():
        for b, rb in results.items():
            if a == b:
                continue
            for x, y in zip(ra, rb):
                qa = np.asarray(x["answer_probs"]) / x["valid_mass"]
                qb = np.asarray(y["answer_probs"]) / y["valid_mass"]
                rows.append({"p": a, "q": b, "id": x["id"], "kl": metrics.kl(qa, qb), "tv": metrics.tv(qa, qb)})
    return rows


def run(cfg: ObserveConfig) -> dict:
    """Every model on every answer prompt of the suite; writes <out>/observe.{json,md,png}."""
    try:
        suite = load_suite(cfg.suite)
    except SuiteError as e:
        raise ConfigError(str(e)) from None
    prompts = [p for p in suite.prompts if p.answers is not None]
    if not prompts:
        raise ConfigError(f"suite '{cfg.suite}' has no prompt with an answer set")
    out = Path(cfg.out)
    check_output(out, "out", is_dir=True)
    paths = [model_path(m) for m in cfg.models]  # every model checked before any loading
    labels = cfg.labels or [Path(str(m)).name.removeprefix("real:") for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two models have the same label {labels}; give labels=[...]")
    if all(is_real(p) or Path(p).exists() for p in paths):  # every model local: nothing may reach a hub
        hub_offline()
    torch.manual_seed(0)
    results, info = {}, {}
    for label, path in zip(labels, paths):
        started = time.time()
        model, tokenizer = load_pretrained(path, cfg.dtype)
        model = model.to(cfg.device).eval()
        loaded = time.time()
        results[label] = observe_model(model, tokenizer, prompts)
        info[label] = {"spec": path, "parameters": sum(t.numel() for t in model.parameters()),
                       "vocab_size": results[label][0]["vocab_size"], "model_type": model.config.model_type,
                       "load_s": round(loaded - started, 1), "evaluate_s": round(time.time() - loaded, 1)}
        print(f"{label}: loaded in {info[label]['load_s']} s, {len(prompts)} prompts in {info[label]['evaluate_s']} s",
              flush=True)
        del model
    pairs = pairwise(results)
    doc = {"suite": suite.name, "prompts": [{"id": p.id, "text": p.text} for p in prompts], "models": info,
           "results": results, "pairwise": pairs, "device": cfg.device, "dtype": cfg.dtype}
    out.mkdir(parents=True, exist_ok=True)
    (out / "observe.json").write_text(json.dumps(doc, indent=1))
    (out / "observe.md").write_text(table(doc))
    figure(doc, out / "observe.png")
    for label, recs in results.items():
        plot_suite([{**r, "max_entropy": math.log(len(r["answers"])), "top_answer": r["top"][0][0]} for r in recs],
                   f"{label} ({info[label]['spec']}) on suite '{suite.name}': exact p(answer)",
                   out / f"answers-{label}.png")
    print(table(doc))
    print(f"wrote {out / 'observe.json'}, {out / 'observe.md'}, {out / 'observe.png'}")
    return doc


def _answer(a: str) -> str:
    return repr(a)[1:-1].strip() or repr(a)


def table(doc: dict) -> str:
    """The post's table as Markdown: per prompt and model, the top answers and the entropies; then the
    mean pairwise KL / TV."""
    lines = [f"# Exact answer distributions on suite '{doc['suite']}' ({doc['dtype']}, {doc['device']})", "",
             "| prompt | model | M | H/log\\|A\\| | H (nats) | post's bar [L, B] (nats) | next-token H (nats) | top answers |",
             "|---|---|---|---|---|---|---|---|"]
    for i, prompt in enumerate(doc["prompts"]):
        for label, recs in doc["results"].items():
            r = recs[i]
            top = ", ".join(f"{_answer(a)}: {p:.3f}" for a, p in r["top"][:5])
            lines.append(f"| {prompt['id']} | {label} | {r['valid_mass']:.3f} | {r['normalised_entropy']:.3f} | "
                         f"{r['answer_entropy']:.3f} | [{r['known_entropy']:.2f}, {r['entropy_upper_bound']:.2f}] | "
                         f"{r['next_token_entropy']:.2f} | {top} |")
    labels = list(doc["results"])
    if len(labels) > 1:
        lines += ["", "Mean over prompts of KL(row ‖ column) (nats) / TV(row, column), normalised answer distributions:", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for a in labels:
            cells = []
            for b in labels:
                if a == b:
                    cells.append("-")
                    continue
                rows = [x for x in doc["pairwise"] if x["p"] == a and x["q"] == b]
                cells.append(f"{np.mean([x['kl'] for x in rows]):.3f} / {np.mean([x['tv'] for x in rows]):.3f}")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "| model | spec | parameters | vocabulary | load (s) | evaluate (s) |", "|---|---|---|---|---|---|"]
    for label, m in doc["models"].items():
        lines.append(f"| {label} | {m['spec']} | {m['parameters'] / 1e6:.1f}M | {m['vocab_size']} | "
                     f"{m['load_s']} | {m['evaluate_s']} |")
    return "\n".join(lines) + "\n"


def figure(doc: dict, path: Path) -> None:
    """The post's figure: per prompt, one bar per model at L = −Σ_a p(a) log p(a) with its uncertainty bar
    up to B; beside it H(q)/log|A| and the valid mass M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ids = list(doc["results"]), [p["id"] for p in doc["prompts"]]
    x, w = np.arange(len(ids)), 0.8 / len(labels)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for k, label in enumerate(labels):
        recs = doc["results"][label]
        low = np.array([r["known_entropy"] for r in recs])
        high = np.array([r["entropy_upper_bound"] for r in recs])
        pos = x + (k - (len(labels) - 1) / 2) * w
        axes[0].bar(pos, low, w, label=label)
        axes[0].errorbar(pos, low, yerr=[np.zeros_like(low), high - low], fmt="none", ecolor="k", capsize=2, lw=0.8)
        axes[1].bar(pos, [r["normalised_entropy"] for r in recs], w, label=label)
        axes[2].bar(pos, [r["valid_mass"] for r in recs], w, label=label)
    titles = ["the post's entropy: −Σ p(a) log p(a), bar up to the bound\n(rest of the mass uniform over V − |A| tokens)",
              "H(p/M) / log|A| (1 = uniform over the answers)", "valid mass M = Σ_a p(a)"]
    for ax, t, yl in zip(axes, titles, ["nats", "share", "probability"]):
        ax.set_xticks(x, ids, rotation=20, fontsize=8)
        ax.set_title(t, fontsize=9)
        ax.set_ylabel(yl)
    axes[1].set_ylim(0, 1), axes[2].set_ylim(0, 1)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    return run(parse(argv))
