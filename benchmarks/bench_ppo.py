"""Completions/s of the lab's PPO against TRL's GRPOTrainer, same model, same batch, one run.

    python benchmarks/bench_ppo.py [--steps N] [--warmup W] [--batch 32] [--new-tokens 16]
                                   [--value-models separate,head] [--threads 1] [--profile]

Both train the lab's base (checkpoints/base/..., made first if missing) for W warm-up steps (not
timed) and then N timed steps, each step generating --batch completions of up to
--new-tokens new tokens (temperature 1, full vocabulary: no top-k / top-p), scored by the world's
gold rater, with a KL coefficient of 0.1 to the frozen base and ONE optimisation pass over the batch:

- lab: `train_ppo` with ppo.ppo_epochs=1, ppo.minibatch_size = ppo.rollout_batch_size = --batch
  (one gradient step per PPO step), reward=gold; step time = `time/step_s` of metrics.jsonl
  (rollout, the three no-grad forwards, scoring, GAE, the update and the metric reduction; not
  the JSON write or the progress bar, which come after it). Once per --value-models entry
  (ppo.value_model: `separate` = a second model; `shared` / `head` (the default) = a scalar head
  on the policy's hidden states, values read off generation: no value forward or backward).
- TRL: GRPOTrainer, beta=0.1, --batch/4 prompts x num_generations=4 per step
  (per_device_train_batch_size = --batch: one generation and one optimizer step per step),
  num_iterations=1, max_completion_length=--new-tokens, top_k=0, float32 (bf16=False) and no
  gradient checkpointing (TRL's defaults turn both on; off is the faster and the like-for-like
  choice on CPU); step time = from the Trainer's on_step_begin to on_step_end.

completions/s = batch x timed steps / summed step time, and batch / median step time (steadier
when another process shares the cores: with torch's OpenMP threads = cores, a preempted thread
stalls every parallel op and a step can take ~10x longer; --threads 1 avoids that). Prints both
trainers' figures, the ratio lab / TRL for each value model (the issue's target is >= 2x) and the
machine. --profile (first value model only) adds the seconds per lab step spent in each part of `train_ppo` (generate, the three no-grad
forwards, the update's forwards, backward and optimizer step, GAE, bookkeeping) and a cProfile
by own time. Run it with nothing else running; tests never assert wall-clock times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import tempfile
import time

import torch

from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
from collapse_lab.core.config import compose

KL_COEF = 0.1
GENERATIONS = 4  # completions per prompt on both sides: TRL's num_generations (GRPO needs a group), ppo.samples_per_prompt


def lab_overrides(args, ck: str, base: str, value_model: str) -> list[str]:
    return [f"checkpoints_dir={ck}", f"ppo.value_model={value_model}", f"base_path={base}", "wandb.mode=disabled", "reward=gold",
            f"ppo.steps={args.warmup + args.steps}", f"ppo.rollout_batch_size={args.batch}",
            f"ppo.minibatch_size={args.batch}", f"ppo.samples_per_prompt={GENERATIONS}", "ppo.ppo_epochs=1",
            f"ppo.max_new_tokens={args.new_tokens}",
            f"ppo.kl_coef={KL_COEF}", "ppo.temperature=1.0", "ppo.save_every=1000000", "name=bench"]


class Breakdown:
    """Seconds per PPO step in each part of `train_ppo`, by wrapping the functions it calls
    (collapse_lab.regimes.ppo's imports and accelerate's methods); a new step starts at each `generate`."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.widths: list[int] = []  # (Tq + Tr) of each rollout: the padded sequence length

    def add(self, part: str, seconds: float) -> None:
        if self.steps:
            self.steps[-1][part] = self.steps[-1].get(part, 0.0) + seconds

    def wrap(self, owner, name: str, part) -> None:
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.add(part(*a) if callable(part) else part, time.perf_counter() - t0)
            return out

        setattr(owner, name, timed)

    def install(self):
        import accelerate

        from collapse_lab.regimes import ppo

        original = ppo.generate_by_length

        def generate(*a, **kw):
            self.steps.append({})
            t0 = time.perf_counter()
            out = original(*a, **kw)
            self.add("1. generate", time.perf_counter() - t0)
            self.widths.append(out.input_ids.shape[1])
            return out

        ppo.generate_by_length = generate

        def logits_part(model, *_):
            if torch.is_grad_enabled():
                return "5. policy forward (grad)"
            frozen = not any(q.requires_grad for q in model.parameters())
            return "1. reference forward (no grad)" if frozen else "1. policy forward (no grad)"

        self.wrap(ppo, "response_logits", logits_part)
        self.wrap(ppo, "value_predictions", lambda *_: "5. value forward (grad)" if torch.is_grad_enabled() else "1. value forward (no grad)")
        self.wrap(ppo, "gae", "4. GAE")
        self.wrap(accelerate.Accelerator, "backward", "5. backward")
        self.wrap(accelerate.Accelerator, "clip_grad_norm_", "5. clip_grad_norm_")
        self.wrap(accelerate.optimizer.AcceleratedOptimizer, "step", "5. optimizer.step")
        self.wrap(accelerate.Accelerator, "reduce", "bookkeeping: accelerator.reduce (one per metric)")
        self.wrap(ppo.json, "dumps", "bookkeeping: json.dumps")
        self.wrap(ppo.tqdm, "update", "bookkeeping: tqdm")
        self.wrap(ppo.tqdm, "set_postfix", "bookkeeping: tqdm")

    def table(self, step_s: list[float], warmup: int) -> str:
        steps = self.steps[warmup:]
        parts = sorted({k for s in steps for k in s})
        mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in parts}
        total = sum(step_s) / len(step_s)
        lines = [f"  {'part of a lab PPO step':<52}{'s/step':>8}{'share':>8}"]
        for k in sorted(parts, key=lambda k: -mean[k]):
            lines.append(f"  {k:<52}{mean[k]:>8.3f}{mean[k] / total:>8.1%}")
        rest = total - sum(v for k, v in mean.items() if not k.startswith("bookkeeping: json") and "tqdm" not in k)
        lines.append(f"  {'rest (scoring, log-softmax, masks, minibatch, ...)':<52}{rest:>8.3f}{rest / total:>8.1%}")
        lines.append(f"  {'time/step_s':<52}{total:>8.3f}")
        lines.append(f"  padded sequence length (prompt + response): mean {sum(self.widths[warmup:]) / len(steps):.1f} tokens")
        return "\n".join(lines)


def bench_lab(args, base: str, value_model: str, profile: bool) -> dict:
    from collapse_lab.regimes.ppo import train_ppo

    with tempfile.TemporaryDirectory() as ck:
        cfg = compose("lab", lab_overrides(args, ck, base, value_model))
        prof = cProfile.Profile() if profile else None
        breakdown = Breakdown() if profile else None
        if breakdown:
            breakdown.install()
        start = time.perf_counter()
        if prof:
            prof.enable()
        out = train_ppo(cfg)
        if prof:
            prof.disable()
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/step_s"] for r in rows[args.warmup:]]
    result = {"step_s": times, "wall_s": wall, "lengths": [r["rollout/length"] for r in rows[args.warmup:]]}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        result["profile"] = breakdown.table(times, args.warmup) + "\n\ncProfile of the whole run (loading and warm-up included), by own time:\n" + s.getvalue()
    return result


def bench_trl(args, base: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from collapse_lab.world.world import make_world

    cfg = compose("lab", [])
    world = make_world(cfg.world)
    steps = args.warmup + args.steps
    prompts_per_step = args.batch // GENERATIONS
    rng = random.Random("bench-trl-prompts")
    dataset = Dataset.from_dict({"prompt": [world.train_prompt(rng).text for _ in range(prompts_per_step * steps)]})
    rater, rater_rng = world.rater, random.Random("bench-trl-rater")

    class Gold:
        """The lab's gold rater as a TRL reward function (ended = the completion holds EOS)."""

        __name__ = "gold"

        def __init__(self, eos: int):
            self.eos = eos

        def __call__(self, prompts, completions, completion_ids, **_):
            return [rater(world.prompt(p), c, rater_rng, self.eos in ids) for p, c, ids in zip(prompts, completions, completion_ids)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, report_to="none", save_strategy="no", logging_steps=steps + 1,
            max_steps=steps, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_generations=GENERATIONS, num_iterations=1, beta=KL_COEF, max_completion_length=args.new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, learning_rate=1e-5, bf16=False, gradient_checkpointing=False,
            disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        timer = StepTimer()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        trainer = GRPOTrainer(model=base, reward_funcs=Gold(tok.eos_token_id), args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"step_s": timer.times[args.warmup:], "wall_s": wall}


def rate(result: dict, batch: int) -> float:
    return batch * len(result["step_s"]) / sum(result["step_s"])  # completions/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each trainer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=32, help="completions per step")
    ap.add_argument("--new-tokens", type=int, default=16, help="max new tokens per completion")
    ap.add_argument("--only", choices=("lab", "trl"), help="run one side only (no ratio)")
    ap.add_argument("--profile", action="store_true", help="time each part of the lab's step, and cProfile it")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--value-models", default="separate,head",
                    help="comma-separated ppo.value_model choices to time (separate | shared | head)")
    args = ap.parse_args()
    value_models = args.value_models.split(",")
    if bad := [v for v in value_models if v not in ("separate", "shared", "head")]:
        raise SystemExit(f"--value-models: unknown {bad}; valid: separate, shared, head")
    if args.batch % GENERATIONS:
        raise SystemExit(f"--batch must be a multiple of {GENERATIONS} (TRL's num_generations)")
    torch.set_flush_denormal(True)  # subnormal floats make CPU training ~50x slower
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import trl

    from collapse_lab.stages.pretrain import resolve_base

    base = str(resolve_base(compose("lab", [])))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl {trl.__version__}, "
          f"cuda {torch.cuda.is_available()}")
    print(f"settings: base {base}; {args.batch} completions/step x <= {args.new_tokens} new tokens, T=1, full vocabulary, "
          f"beta {KL_COEF}, one gradient step per step, float32; {args.warmup} warm-up + {args.steps} timed steps")

    results = {}
    if args.only in (None, "lab"):
        for i, vm in enumerate(value_models):
            results[f"lab[{vm}]"] = bench_lab(args, base, vm, args.profile and i == 0)
    if args.only in (None, "trl"):
        results["trl"] = bench_trl(args, base)
    for name, r in results.items():
        s = sorted(r["step_s"])
        extra = f"; mean completion length {sum(r['lengths']) / len(r['lengths']):.1f} tokens" if "lengths" in r else ""
        print(f"{name:>14}: {rate(r, args.batch):6.1f} completions/s ({args.batch / s[len(s) // 2]:.1f} at the median step "
              f"{s[len(s) // 2]:.3f} s, "
              f"min {s[0]:.3f}, max {s[-1]:.3f}; whole run incl. loading {r['wall_s']:.1f} s){extra}")
    median = {k: sorted(r["step_s"])[len(r["step_s"]) // 2] for k, r in results.items()}
    for name in [k for k in results if k.startswith("lab") and "trl" in results]:
        ratio = rate(results[name], args.batch) / rate(results["trl"], args.batch)
        print(f"ratio {name} / TRL: {ratio:.2f}x (target >= 2x); at the median steps {median['trl'] / median[name]:.2f}x")
    for r in results.values():
        if "profile" in r:
            print(r["profile"])


if __name__ == "__main__":
    main()
