"""The launch configs in recipes/accelerate/ load with accelerate's own loader and say what they claim.

Cheap: nothing is launched (the two-process run is another test's).
"""

import re

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from collapse_lab.core.config import RECIPES_DIR

CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))

# file -> (distributed type, processes, mixed precision, on CPU)
EXPECTED = {
    "ddp": (DistributedType.MULTI_GPU, 8, "bf16", False),
    "fsdp": (DistributedType.FSDP, 8, "bf16", False),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, "bf16", False),
    # MULTI_GPU + use_cpu: accelerate's torchrun launcher, each process then MULTI_CPU (see the file)
    "cpu2": (DistributedType.MULTI_GPU, 2, "no", True),
}


def test_every_config_is_known():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_accelerate(path):
    cfg = load_config_from_file(str(path))
    distributed_type, processes, precision, cpu = EXPECTED[path.stem]
    assert cfg.distributed_type == distributed_type
    assert cfg.num_processes == processes
    assert cfg.num_machines == 1
    assert str(cfg.mixed_precision) == precision
    assert cfg.use_cpu is cpu


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_starts_with_its_command_line(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), f"{path.name}: starts with a comment"
    head = "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))])
    command = re.search(r"accelerate launch --config_file (\S+) (train/\w+\.py)", head)
    assert command, f"{path.name}: no 'accelerate launch --config_file ...' line in its header"
    assert command.group(1) == f"recipes/accelerate/{path.name}"
    assert (RECIPES_DIR.parent / command.group(2)).is_file()


def test_fsdp_is_fsdp2_full_shard_wrapping_decoder_layers():
    fsdp = load_config_from_file(str(RECIPES_DIR / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == LlamaDecoderLayer.__name__  # the lab's tiny base (llama)


def test_deepspeed_is_zero2():
    ds = load_config_from_file(str(RECIPES_DIR / "accelerate" / "deepspeed_zero2.yaml")).deepspeed_config
    assert ds["zero_stage"] == 2
