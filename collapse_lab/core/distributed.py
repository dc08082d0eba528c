"""Batch arithmetic in one place (CleanRL style)."""

import os

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, parse_flag_from_env

from collapse_lab.core.config import ConfigError


def world_size() -> int:
    """Processes in this run (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_state() -> PartialState:
    """accelerate's process state for this launch, distributed whenever the launch is (its barriers wait).

    A bare `PartialState()` on a machine without a GPU is NOT distributed, even under `accelerate launch
    --multi_gpu` with ACCELERATE_USE_CPU=true (accelerate reads that flag in AcceleratorState only): its
    `main_process_first` then lets every process through at once. It is a process-wide singleton, so one
    made bare earlier (by a library) is made again here. A plain one-process run keeps accelerate's own
    choice of device (a GPU, Apple's MPS, else the CPU)."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size() > 1 and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if world_size() > 1 and state.distributed_type == DistributedType.NO:
        PartialState._reset_state()
        state = PartialState(cpu=cpu)
    return state


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, or a one-line error naming `what` when it does not divide."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b
