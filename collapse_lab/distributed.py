"""Batch arithmetic in one place (CleanRL style)."""

import os

from collapse_lab.config import ConfigError


def world_size() -> int:
    """Processes in this run (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, or a one-line error naming `what` when it does not divide."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b
