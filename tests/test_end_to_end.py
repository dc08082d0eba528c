"""End-to-end (slow): the README's main job on the embedded default, and multi-process pretraining.

The main job pretrains the DEFAULT tiny base and evaluates it; the base must be uncollapsed
on every seed prompt (valid mass >= 0.9, answer entropy >= 0.9 log|answers|), as davinci was.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_PRETRAIN
from test_readme import quick_start

pytestmark = pytest.mark.slow


def test_readme_main_job_builds_an_uncollapsed_base(tmp_path):
    main_job = quick_start()[0]
    cmd = f"{main_job} checkpoints_dir={tmp_path} wandb.mode=disabled"
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    (base,) = (tmp_path / "base").iterdir()
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 300
    result = json.loads((base / "eval" / "seed.json").read_text())
    assert len(result["prompts"]) == 5
    for p in result["prompts"]:
        assert p["valid_mass"] >= 0.9, p["id"]
        assert p["answer_entropy"] >= 0.9 * math.log(len(p["answers"])), p["id"]
    assert (base / "eval" / "seed.png").exists()


def test_pretrain_under_accelerate_with_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "WANDB_MODE": "disabled"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "train/pretrain.py",
           *TINY_PRETRAIN, f"checkpoints_dir={tmp_path}"]
    r = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (base,) = (tmp_path / "base").iterdir()
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 2 and manifest["steps"] == 6
    assert manifest["sequences_seen"] == 6 * 4  # batch_size is global: 2 per process
