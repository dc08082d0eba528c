import os
import re
import socket
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# pytest-xdist runs two workers (pyproject: -n 2): each, and every process a test starts, gets one
# thread, so that two workers on 2 cores do not oversubscribe OpenMP (~10x slower steps)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

# Subnormal floats are ~90x slower on CPU; torch's worker threads copy this setting when they start,
# so it must come before any test computes (collapse_lab/stages/ratings.py: flush_denormals).
torch.set_flush_denormal(True)

import collapse_lab.regimes.registry  # noqa: E402,F401  (registers the regimes' config sections: lab configs compose)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# A pretraining config small enough for a unit test (seconds on 2 cores).
TINY_PRETRAIN = [
    "wandb.mode=disabled", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
    "model.intermediate_size=64", "model.vocab_size=300", "pretrain.steps=6", "pretrain.batch_size=4",
    "pretrain.save_every=2", "pretrain.log_every=2", "pretrain.tokenizer_docs=300",
]


def free_port() -> int:
    """A TCP port nothing listens on now: each test's `accelerate launch` gets its own rendezvous port.
    On the default (29500) two launches that pytest-xdist runs side by side join each other's group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_cpu(processes: int, script: str, *args: str) -> list[str]:
    """`accelerate launch` of a lab script on `processes` CPU processes (set ACCELERATE_USE_CPU=true)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", script, *args]


def launch_failure(stderr: str, tail: int = 1500) -> str:
    """What a failed `accelerate launch` says: each rank's own last traceback (torchrun prefixes a
    worker's lines with [rankN]:), then the launcher's tail. The tail alone shows the rank that
    noticed a peer was gone, not the peer's own error."""
    ranks: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        m = re.match(r"\[(rank\d+)\]:(.*)", line)
        if m:
            lines = ranks.setdefault(m[1], [])
            if m[2].startswith("Traceback"):
                lines.clear()
            lines.append(m[2])
    own = "".join(f"--- {rank}\n" + "\n".join(lines[-40:]) + "\n" for rank, lines in sorted(ranks.items()))
    return own + "--- launcher\n" + stderr[-tail:]


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command of the lab as a user would, from the repo root."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
