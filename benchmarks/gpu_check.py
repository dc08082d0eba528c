"""GPU check (issue 16): the quick and the default ablation on a Pythia-160m-shaped model, with timings and PPO MFU.

    python benchmarks/gpu_check.py                 # on a CUDA machine; < 9 min on one H100 (hard deadline)
    python benchmarks/gpu_check.py --smoke         # CPU: the same steps on a tiny model, a few steps per stage

On a bare CUDA image with PyTorch/transformers/accelerate/peft/tokenizers but without trl, datasets, hydra-core,
omegaconf (this workplace's GPU machines), carry the wheels that `bash benchmarks/gpu_wheels.sh .whl` downloads
here, then there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py

Nothing is downloaded (the machine may have no internet):
    1. tokenizer  a GPT-NeoX-style byte-level BPE (no digit splitting, no pad token, as Pythia's) trained by
                  `tokenizers` on the embedded world's corpus (collapse_lab.models.tokenizer.train_tokenizer)
    2. model      GPTNeoXConfig with Pythia-160m's shape (12 layers, 768 wide, 12 heads, MLP 3072, rotary
                  on 25% of each head, parallel residual, untied 50304-row embeddings: 162.3M parameters,
                  Pythia-160m's count), randomly initialised, saved with save_pretrained
    3. quick      `collapse-lab ablate preset=quick model=pythia-160m model.path=<dir> precision=bf16 ...`
    4. default    the same with preset=default (3 seeds, six regimes + FeedME's control)
    5. tests      tests/test_gpu.py (bf16 stages on the GPU, the accelerate FSDP/DDP launch configs), if
                  time is left
Each step runs as a subprocess under the remaining time budget (--budget-s, default 530 s): a step that
would overrun is stopped and reported as such (a rerun resumes the ablation from its finished stages).

The base is RANDOM: the ablation's verdict means nothing here, and every completion runs to max_new_tokens
(a random model almost never samples EOS), so the times are the worst case for these lengths.

PPO MFU (model FLOPs utilisation), over all PPO runs of an ablation:

    MFU_train = 6·N·T_train / t_ppo / peak
    N       = parameters that multiply activations per token: all but the input embedding (Pythia's
              embed_in is a lookup; embed_out is a matmul): 162.3M − 38.6M = 123.7M
    T_train = Σ over PPO runs of tokens_trained (response tokens, EOS included: the manifest's) × ppo_epochs
    t_ppo   = Σ over PPO runs of the manifest's wall_time_s (sampling, reference, scoring, updates, logging)
    peak    = the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989, A100 312;
              --peak-tflops overrides)
    MFU_all = (2·N [sampling] + 2·N [reference] + 6·N·ppo_epochs [update]) · T / t_ppo / peak,
              T = Σ tokens_trained: every forward the step runs over the response tokens.
Both are LOWER bounds of the hardware's use: prompt tokens (computed once per distinct prompt) and
attention's own FLOPs (sequence lengths here are < 100) are not counted.

Outputs: under $OUT when set (else checkpoints/gpu_check/): gpu_check.json (all numbers), gpu_check.log,
and each ablation's directory (report.md, report.json, plots, the stages' manifests; no weights). The
stage checkpoints (weights) go to --scratch (default /tmp/collapse-lab-gpu-check), never under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PYTHIA_160M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                   tie_word_embeddings=False, vocab_size=50304, layer_norm_eps=1e-5, hidden_act="gelu",
                   initializer_range=0.02)
SMOKE = dict(PYTHIA_160M, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=1088, max_position_embeddings=512)
# dense bf16 tensor-core peaks, FLOP/s (NVIDIA data sheets; the SXM parts unless the name says otherwise)
PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H800", 989.4e12),
         ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]
# GPU speed knobs that do not change the algorithm: bf16 autocast, and one forward per 64 sequences
# (micro-batches: gradients accumulate to the same minibatch; tests/test_ppo.py checks the split changes nothing)
GPU = ["precision=bf16", "ppo.micro_batch_size=64"]
# --smoke: a few steps per stage (as tests/test_families.py)
TINY = ["ratings.prompts=24", "ratings.max_new_tokens=6", "reward_model.epochs=1", "reward_model.batch_size=16",
        "sft.batch_size=8", "ppo.steps=2", "ppo.rollout_batch_size=16", "ppo.minibatch_size=8", "ppo.max_new_tokens=6",
        "eval.samples=8", "eval.gold_samples=8", "eval.max_new_tokens=6", "eval.story_max_new_tokens=8"]


def build_model(path: Path, shape: dict, docs: int) -> dict:
    """Steps 1-2: the tokenizer and the randomly initialised model, saved to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from collapse_lab.regimes import registry  # noqa: F401 registers the regimes' config sections
    from collapse_lab.core.config import compose
    from collapse_lab.models.tokenizer import train_tokenizer
    from collapse_lab.world.world import World

    started = time.time()
    tokenizer = train_tokenizer(World(compose("lab", []).world).corpus(docs, seed="gpu-check"), 4096, split_digits=False)
    tokenizer.pad_token = None  # as Pythia's: the lab pads with EOS (and gives the reward model its own pad)
    torch.manual_seed(0)
    config = GPTNeoXConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {"path": str(path), "parameters": total, "input_embedding": embed, "N": total - embed,
            "tokenizer_size": len(tokenizer), "config": shape, "build_s": time.time() - started}


def run_step(name: str, cmd: list[str], deadline: float, log) -> dict:
    """A subprocess with the time left; its output goes to the log."""
    left = deadline - time.time()
    if left < 20:
        return {"step": name, "status": "skipped (no time left)"}
    started = time.time()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    try:
        r = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=left,
                           env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
    except subprocess.TimeoutExpired:
        status = f"stopped at the deadline after {left:.0f} s"
    wall = time.time() - started
    print(f"{name}: {status}, {wall:.1f} s", flush=True)
    return {"step": name, "status": status, "wall_s": wall}


def peak_flops(override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e12, "given"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name(0)
    return next(((p, name) for key, p in PEAKS if key in name), (None, name))


def ppo_mfu(ablation: Path, N: int, peak: float | None) -> dict:
    """MFU over the ablation's PPO runs (formula in the module docstring), from their manifests and configs."""
    from omegaconf import OmegaConf

    runs = json.loads((ablation / "runs.json").read_text())["runs"]
    rows = []
    for r in runs:
        if r["family"] != "ppo":
            continue
        d = ablation / "runs" / r["regime"] / f"s{r['seed']}"
        m = json.loads((d / "manifest.json").read_text())
        epochs = OmegaConf.load(d / "config.yaml").ppo.ppo_epochs
        rows.append({"run": f"{r['regime']}/s{r['seed']}", "steps": m["steps"], "wall_s": m["wall_time_s"],
                     "tokens": m["tokens_trained"], "epochs": epochs, "s_per_step": m["wall_time_s"] / m["steps"]})
    if not rows:
        return {}
    t = sum(x["wall_s"] for x in rows)
    train_flops = sum(6 * N * x["tokens"] * x["epochs"] for x in rows)
    all_flops = sum((2 * N + 2 * N + 6 * N * x["epochs"]) * x["tokens"] for x in rows)
    out = {"ppo_runs": len(rows), "ppo_wall_s": t, "ppo_tokens_trained": sum(x["tokens"] for x in rows),
           "ppo_s_per_step_median": sorted(x["s_per_step"] for x in rows)[len(rows) // 2],
           "train_tflops_per_s": train_flops / t / 1e12, "all_tflops_per_s": all_flops / t / 1e12, "runs": rows}
    if peak:
        out.update(mfu_train=train_flops / t / peak, mfu_all=all_flops / t / peak)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model, a few steps per stage (runs on a CPU)")
    ap.add_argument("--budget-s", type=float, default=530, help="hard deadline for the whole check (seconds)")
    ap.add_argument("--scratch", default="/tmp/collapse-lab-gpu-check", help="stage checkpoints (weights) go here")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--skip-default", action="store_true", help="the quick ablation only")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/test_gpu.py at the end")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    started = time.time()
    out = Path(os.environ.get("OUT") or REPO / "checkpoints" / "gpu_check")
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)  # from an empty checkpoints directory, every time
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True)

    import torch

    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "smoke": args.smoke, "budget_s": args.budget_s}
    peak, peak_source = peak_flops(args.peak_tflops)
    result["peak_bf16_flops"], result["peak_source"] = peak, peak_source
    model = build_model(scratch / "pythia-160m-local", SMOKE if args.smoke else PYTHIA_160M, 2000 if args.smoke else 20000)
    result["model"] = model
    print(f"model: {model['parameters'] / 1e6:.1f}M parameters (N = {model['N'] / 1e6:.1f}M without the input "
          f"embedding), tokenizer {model['tokenizer_size']} tokens, built in {model['build_s']:.1f} s", flush=True)

    common = ["model=pythia-160m", f"model.path={model['path']}", f"checkpoints_dir={scratch / 'checkpoints'}",
              *(["precision=no", *TINY] if args.smoke else GPU)]
    presets = ["quick"] + ([] if args.skip_default or args.smoke else ["default"])
    steps = []
    with (out / "gpu_check.log").open("w") as log:
        for preset in presets:
            name = f"gpu-{preset}"
            cmd = [sys.executable, "-m", "collapse_lab.cli", "ablate", f"preset={preset}", f"name={name}", *common]
            step = run_step(f"ablate preset={preset}", cmd, deadline, log)
            ablation = scratch / "checkpoints" / "ablations" / name
            if (ablation / "runs.json").is_file():
                step["ppo"] = ppo_mfu(ablation, model["N"], peak)
                manifest = json.loads((ablation / "manifest.json").read_text())
                step["ablation_wall_s"] = manifest.get("wall_time_s")
                step["stages"] = manifest.get("stages")
                shutil.copytree(ablation, out / "ablations" / name, dirs_exist_ok=True)
            steps.append(step)
            result["steps"] = steps
            (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
        if not args.skip_tests and not args.smoke and torch.cuda.is_available():
            steps.append(run_step("tests/test_gpu.py", [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_gpu.py"],
                                  deadline, log))
    result.update(steps=steps, total_wall_s=time.time() - started)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'step':<24} {'status':<34} {'wall (s)':>9} {'PPO s/step':>11} {'PPO TFLOP/s':>12} {'MFU train':>10} {'MFU all':>8}")
    for s in steps:
        p = s.get("ppo") or {}
        fmt = lambda k, f: format(p[k], f) if k in p else "-"  # noqa: E731
        print(f"{s['step']:<24} {s['status']:<34} {s.get('wall_s', 0):>9.1f} {fmt('ppo_s_per_step_median', '.3f'):>11} "
              f"{fmt('train_tflops_per_s', '.2f'):>12} {fmt('mfu_train', '.2%'):>10} {fmt('mfu_all', '.2%'):>8}")
    print(f"total {result['total_wall_s']:.1f} s on {result['device']} (peak {peak_source}: "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16); numbers in {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
