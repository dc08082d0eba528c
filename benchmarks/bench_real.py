"""What a real pretrained base costs against the lab's tiny one: one run, both bases, the ratio.

    python benchmarks/bench_real.py [--real gemma3-270m] [--tiny-base checkpoints/base/<run>]
                                    [--steps 3] [--batch 16] [--new-tokens 6] [--threads 2]

Each base runs in its own child process (so each peak RSS is its own), through the same stages:
  load      `load_pretrained` of the base's directory (the real one dequantised beforehand: that is
            once per machine, collapse_lab/models/real_models.py; its time is in checkpoints/real/*/source.json)
  evaluate  the exact evaluator's answer distributions on the five seed prompts
  ppo       `train_ppo`, reward=gold, one warm-up step then --steps timed steps of --batch completions of
            up to --new-tokens tokens (the real base with LoRA r = 8 and the k1 KL estimator, as in
            recipes/preset/gemma3-270m.yaml; the tiny base in full, as the lab trains it); each step's
            `time/step_s` and `rollout/length` from metrics.jsonl give completions/s and tokens/s
and prints wall time per stage, peak RSS (getrusage), PPO completions/s and response tokens/s, the real
base's figures over the tiny one's, and the LM head's share of the PPO steps' time: forward (and, for the
update, backward) hooks on the output layer time it, over the PPO stage's wall time (its loading, the steps
and its along-training evaluation, all of which read the head). The tiny base is the
newest checkpoints/base/* unless given (made with preset=quick's 120 steps if there is none).
Benchmarks print what they measure; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class HeadTimer:
    """Seconds spent in the output layer (the LM head), forward and backward, via module hooks."""

    def __init__(self, head):
        self.seconds, self._t = 0.0, {}
        head.register_forward_pre_hook(lambda m, a: self._start("f"))
        head.register_forward_hook(lambda m, a, o: self._stop("f"))
        head.register_full_backward_pre_hook(lambda m, g: self._start("b"))
        head.register_full_backward_hook(lambda m, gi, go: self._stop("b"))

    def _start(self, k):
        self._t[k] = time.perf_counter()

    def _stop(self, k):
        if k in self._t:
            self.seconds += time.perf_counter() - self._t.pop(k)


def one_base(kind: str, path: str, args, out: dict) -> None:
    """Every stage on one base (in a child process); the figures into `out` (a Manager dict)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from collapse_lab.regimes import ppo as ppo_module
    from collapse_lab.core.config import compose, quiet_libraries
    from collapse_lab.evaluation.evaluator import answer_distribution
    from collapse_lab.models.models import load_pretrained
    from collapse_lab.core.suites import load_suite

    quiet_libraries()
    fig = {"kind": kind, "path": path}
    t = time.perf_counter()
    model, tok = load_pretrained(path)
    fig["load_s"] = time.perf_counter() - t
    fig["parameters"] = sum(p.numel() for p in model.parameters())
    fig["vocab_size"] = model.get_output_embeddings().weight.shape[0]
    t = time.perf_counter()
    for p in load_suite("seed").prompts:
        answer_distribution(model, tok, p.text, p.answers, p.continue_chars)
    fig["evaluate_s"] = time.perf_counter() - t
    del model

    real = kind == "real"
    timers = []
    real_load = ppo_module.load_pretrained

    def timed_load(*a, **k):  # the policy's (and a full fine-tune's reference's) LM head, timed through the stage
        model, tokenizer = real_load(*a, **k)
        timers.append(HeadTimer(model.get_output_embeddings()))
        return model, tokenizer

    ppo_module.load_pretrained = timed_load
    with tempfile.TemporaryDirectory() as ck:
        lora = ["peft.enabled=true", "peft.r=8", "peft.alpha=16", "ppo.kl_estimator=k1"] if real else []
        cfg = compose("lab", [f"checkpoints_dir={ck}", f"base_path={path}", "reward=gold", "wandb.mode=disabled",
                              f"ppo.steps={args.steps + 1}", f"ppo.rollout_batch_size={args.batch}",
                              f"ppo.minibatch_size={args.batch // 2}", f"ppo.micro_batch_size={args.batch // 2}",
                              "ppo.samples_per_prompt=4", "ppo.ppo_epochs=2", f"ppo.max_new_tokens={args.new_tokens}",
                              f"ppo.generation_batch_size={args.batch}", "ppo.save_every=1000", "curve.points=0",
                              "name=bench", *lora])
        t = time.perf_counter()
        run = Path(ppo_module.train_ppo(cfg))
        fig["ppo_s"] = time.perf_counter() - t
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r]
    timed = rows[1:]  # after the warm-up step
    step_s = sum(r["time/step_s"] for r in timed)
    fig["ppo_steps"] = len(timed)
    fig["completions_per_s"] = args.batch * len(timed) / step_s
    fig["tokens_per_s"] = sum(args.batch * r["rollout/length"] for r in timed) / step_s
    fig["lm_head_share"] = sum(h.seconds for h in timers) / fig["ppo_s"]
    fig["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out[kind] = fig


def tiny_base(given: str | None) -> str:
    if given:
        return given
    bases = sorted((REPO / "checkpoints" / "base").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if bases:
        return str(bases[-1].parent)
    from collapse_lab.core.config import compose
    from collapse_lab.stages.pretrain import pretrain

    return str(pretrain(compose("lab", ["wandb.mode=disabled", "pretrain.steps=120", "pretrain.save_every=60"]),
                        named=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default="gemma3-270m", help="a real model preset (recipes/model/<name>.yaml)")
    ap.add_argument("--tiny-base", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from collapse_lab.models.real_models import resolve

    t = time.perf_counter()
    real_path = resolve(f"real:{args.real}")  # once per machine (a no-op when cached)
    resolve_s = time.perf_counter() - t
    paths = {"tiny": tiny_base(args.tiny_base), "real": real_path}
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        for kind, path in paths.items():
            p = ctx.Process(target=one_base, args=(kind, path, args, out))
            p.start(), p.join()
            if p.exitcode:
                raise SystemExit(f"{kind} base failed (exit {p.exitcode})")
        figs = dict(out)
    keys = [("load_s", "load (s)"), ("evaluate_s", "evaluate 5 seed prompts (s)"), ("ppo_s", "ppo stage (s)"),
            ("completions_per_s", "PPO completions/s"), ("tokens_per_s", "PPO response tokens/s"),
            ("lm_head_share", "LM head share of the PPO stage"), ("peak_rss_gib", "peak RSS (GiB)")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"PPO: {args.steps} timed steps of {args.batch} completions, <= {args.new_tokens} new tokens")
    print(f"resolve real:{args.real}: {resolve_s:.1f} s (dequantised beforehand: see {real_path}/source.json)")
    print(f"{'':34s}{'tiny':>14s}{args.real:>16s}{'real / tiny':>14s}")
    for k, label in keys:
        a, b = figs["tiny"][k], figs["real"][k]
        print(f"{label:34s}{a:14.3f}{b:16.3f}{b / a if a else float('nan'):14.2f}")
    print(f"{'parameters':34s}{figs['tiny']['parameters']:14,d}{figs['real']['parameters']:16,d}")
    print(f"{'vocabulary':34s}{figs['tiny']['vocab_size']:14,d}{figs['real']['vocab_size']:16,d}")


if __name__ == "__main__":
    main()
