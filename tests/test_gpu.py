"""GPU readiness (issue 16): mixed precision in every stage, device placement, the accelerate launch configs.

The first test runs everywhere (bf16 autocast on the CPU: slow per FLOP, but tiny); the rest need CUDA
and are skipped without it. On a GPU machine: `python -m pytest tests/test_gpu.py` (and
`bash benchmarks/gpu_check.sh` for the timings)."""

import json
import subprocess
import sys

import pytest
import torch

from collapse_lab.core.config import compose
from collapse_lab.stages.pretrain import pretrain
from conftest import REPO, TINY_PRETRAIN, free_port

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# every stage of the ablation, a couple of steps each
TINY_STAGES = ["ratings.prompts=8", "ratings.max_new_tokens=4", "reward_model.epochs=1", "sft.batch_size=8",
               "ppo.steps=2", "ppo.rollout_batch_size=8", "ppo.samples_per_prompt=4", "ppo.minibatch_size=4",
               "ppo.max_new_tokens=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('base')}"])))


def _stages(base, ck, *extra):
    """ratings -> reward model -> FeedME and PPO (reward=rm), one config."""
    from collapse_lab.regimes.ppo import train_ppo
    from collapse_lab.stages.reward_model import train_reward_model
    from collapse_lab.regimes.sft import train_sft

    cfg = compose("lab", ["wandb.mode=disabled", f"base_path={base}", f"checkpoints_dir={ck}", "reward=rm",
                          *TINY_STAGES, *extra])
    sft = train_sft(cfg, named=False)
    train_reward_model(cfg, named=False)  # PPO's reward=rm finds it; nothing trains it as a side effect
    ppo = train_ppo(compose("lab", ["wandb.mode=disabled", f"base_path={base}", f"checkpoints_dir={ck}", "reward=rm",
                                    "recipe=kl0.1", *TINY_STAGES, *extra]), named=False)
    return sft, ppo


def test_bf16_autocast_runs_every_stage_on_this_device(base, tmp_path):
    """precision=bf16: pretraining, ratings, the reward model, FeedME and PPO under autocast (weights fp32)."""
    from collapse_lab.models.models import load_pretrained, mixed_precision

    cfg = compose("lab", TINY_PRETRAIN + ["precision=bf16", "pretrain.steps=2", f"checkpoints_dir={tmp_path / 'b'}"])
    assert mixed_precision(cfg) == "bf16"
    out = pretrain(cfg)
    assert load_pretrained(str(out))[0].dtype == torch.float32  # autocast, not a bf16 copy
    sft, ppo = _stages(base, tmp_path / "ck", "precision=bf16")
    for run in (sft, ppo):
        m = json.loads((run / "manifest.json").read_text())
        assert m["status"] == "finished" and m["steps"] >= 1
    rows = [json.loads(x) for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)


def test_ppo_after_a_bf16_trainer_in_the_same_process_runs_at_its_own_precision(base, tmp_path):
    """A trainer leaves its mixed precision in accelerate's process-wide state; PPO in an ablation (after the
    reward model and FeedME, one process) inherited it, while the same run alone was fp32."""
    from accelerate.state import AcceleratorState

    from collapse_lab.regimes.ppo import train_ppo

    _stages(base, tmp_path, "precision=bf16")  # FeedME and the reward model in bf16, then PPO at auto
    assert AcceleratorState().mixed_precision == "bf16"  # the reward model's trainer ran last
    train_ppo(compose("lab", ["wandb.mode=disabled", f"base_path={base}", f"checkpoints_dir={tmp_path}", "reward=rm",
                              "recipe=kl0", *TINY_STAGES]), named=False)  # its reward model is found finished
    assert AcceleratorState().mixed_precision == "no"  # precision=auto, no launcher: fp32, as when run alone


def test_precision_auto_follows_the_launcher(monkeypatch):
    from collapse_lab.models.models import mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert mixed_precision(compose("lab", [])) == "bf16"
    assert mixed_precision(compose("lab", ["precision=no"])) == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert mixed_precision(compose("lab", [])) == "no"


def test_no_stage_places_models_on_the_cpu_by_name():
    """Device placement goes through models.default_device / accelerate; no model is sent to "cpu" by name."""
    import re

    for path in (REPO / "collapse_lab").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not re.search(r"""(\.to\(|device\s*=\s*)["']cpu["']""", code), f"{path.name}:{i}: {line.strip()}"
            assert '"cuda" if torch.cuda.is_available() else "cpu"' not in code, f"{path.name}:{i}: use default_device()"


# ------------------------------------------------------------------------------ CUDA only


@cuda
def test_every_stage_on_the_gpu_in_bf16(base, tmp_path):
    from collapse_lab.stages.rewards import ModelReward

    sft, ppo = _stages(base, tmp_path, "precision=bf16")
    assert json.loads((ppo / "manifest.json").read_text())["status"] == "finished"
    rm = next((tmp_path / "reward").iterdir())
    assert ModelReward(str(rm), "cuda").model.device.type == "cuda"


@cuda
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_accelerate_launch_configs_run_ppo_on_the_gpus(base, tmp_path, config):
    """`accelerate launch --config_file recipes/accelerate/<config>.yaml train/ppo.py ...` with as many
    processes as GPUs (1 is enough to exercise the config: bf16, FSDP2 wrapping of the Llama blocks)."""
    n = torch.cuda.device_count()
    if config == "ddp" and n < 2:
        pytest.skip("DDP needs 2 GPUs")
    batch = 8 * n
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}.yaml", "--num_processes", str(n),
           "--main_process_port", str(free_port()), "train/ppo.py", "wandb.mode=disabled", f"base_path={base}", f"checkpoints_dir={tmp_path}", "recipe=kl0.1",
           "ppo.steps=2", f"ppo.rollout_batch_size={batch}", f"ppo.minibatch_size={batch // 2}", "ppo.max_new_tokens=4",
           "ppo.samples_per_prompt=4", "name=launched"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ppo" / "launched" / "manifest.json").read_text())
    assert m["status"] == "finished" and m["world_size"] == n and m["steps"] == 2
