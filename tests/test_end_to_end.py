"""End-to-end (slow): the README's main job (the matched ablation) at the quick preset, and
multi-process pretraining.

The main job pretrains its own base, rates, trains the reward model and every regime, evaluates
them all with the base as reference and writes the report; the base must be uncollapsed on every
seed prompt (valid mass >= 0.9, answer entropy >= 0.9 log|answers|), as davinci was.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_PRETRAIN, launch_failure, launch_on_cpu
from test_readme import quick_start

pytestmark = pytest.mark.slow


def test_readme_main_job_runs_the_whole_ablation_at_the_quick_preset(tmp_path):
    main_job = quick_start()[0]
    cmd = f"{main_job} preset=quick checkpoints_dir={tmp_path}"
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    (out,) = (tmp_path / "ablations").iterdir()
    report = json.loads((out / "report.json").read_text())
    regimes = ["sft", "bok", "kl0", "kl0.01", "kl0.1", "ent0.01"]
    assert set(report["regimes"]) == {*regimes, "sft-random"}  # FeedME's finite-sample control comes along
    assert "with a KL penalty (PPO, RLOO, GRPO) collapse less than FeedME" in report["verdict"]["text"]
    assert report["verdict"]["text"].splitlines()[0] in r.stdout  # the verdict is printed at the end
    for name in regimes:
        assert (out / "plots" / f"post_{name}.png").exists(), name
    assert "| regime" in (out / "report.md").read_text()
    # any pair at matched KL (benchmarks/matched_pair.py): a report pair gives the report's D, kl0 (not a report
    # pair) gets one too, and an unknown regime is refused with the valid names
    pair = lambda *a: subprocess.run([sys.executable, "benchmarks/matched_pair.py", str(out), *a], cwd=REPO,  # noqa: E731
                                     capture_output=True, text=True, timeout=300)
    (c,) = [c for c in report["frontier"]["comparisons"] if (c["regime"], c["feedme"], c["x"]) == ("kl0.1", "sft", "kl")]
    r = pair("kl0.1", "sft")
    assert r.returncode == 0 and f"D {c['difference']['mean']:+.4f}" in r.stdout, (r.stdout, r.stderr, c)
    r = pair("kl0", "sft")
    assert r.returncode == 0 and re.search(r"kl: range \[[0-9.]+, [0-9.]+\], 1 seeds, D [+-]0\.\d{4}", r.stdout), r.stdout
    r = pair("kl9", "sft")
    assert r.returncode != 0 and "'kl9'" in r.stderr and "kl0.1" in r.stderr and r.stdout == ""
    (base,) = (tmp_path / "base").iterdir()
    result = json.loads((out / "evals" / "base" / "seed.json").read_text())
    assert json.loads((base / "manifest.json").read_text())["status"] == "finished"
    assert len(result["prompts"]) == 5
    for p in result["prompts"]:
        assert p["valid_mass"] >= 0.9, p["id"]
        assert p["answer_entropy"] >= 0.9 * math.log(len(p["answers"])), p["id"]


def test_pretrain_under_accelerate_with_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "WANDB_MODE": "disabled"}
    cmd = launch_on_cpu(2, "train/pretrain.py", *TINY_PRETRAIN, "pretrain.micro_batches=2",  # 2 per process, in 2
                        f"checkpoints_dir={tmp_path}")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, launch_failure(r.stderr)
    (base,) = (tmp_path / "base").iterdir()
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 2 and manifest["steps"] == 6
    assert manifest["sequences_seen"] == 6 * 4  # batch_size is global: 2 per process


def test_main_process_first_waits_under_a_cpu_launch(tmp_path):
    """pretrain's tokenizer: the main process trains and publishes it, the others wait and load it. A bare
    PartialState() on a CPU machine is not distributed under `accelerate launch` (its barriers do nothing:
    both processes once wrote the tokenizer at the same time); process_state() is."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, time\n"
        "from accelerate import PartialState\n"
        "PartialState()  # made bare first, as a library may: the singleton process_state must remake\n"
        "from collapse_lab.core.distributed import process_state\n"
        "state, mark = process_state(), os.environ['MARK']\n"
        "with state.main_process_first():\n"
        "    if state.is_main_process:\n"
        "        time.sleep(1.0)\n"
        "        open(mark, 'w').write('main')\n"
        "    seen = open(mark).read() if os.path.exists(mark) else None\n"
        "print(json.dumps({'type': state.distributed_type.name, 'rank': state.process_index, 'seen': seen}))\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MARK": str(tmp_path / "mark")}
    r = subprocess.run(launch_on_cpu(2, str(probe)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, launch_failure(r.stderr)
    # the two processes' lines may reach the launcher's stdout run together
    rows = sorted((json.loads(x) for x in re.findall(r"\{[^{}]*\}", r.stdout)), key=lambda x: x["rank"])
    assert rows == [{"type": "MULTI_CPU", "rank": 0, "seen": "main"}, {"type": "MULTI_CPU", "rank": 1, "seen": "main"}]
