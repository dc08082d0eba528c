"""W&B logging: offline by default (no account needed), `wandb.mode=disabled` in tests.

The run is started here, on the main process, with the lab's resolved config, and its
files go to the run directory; transformers' Trainer finds the active run and logs into it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from collapse_lab.core.distributed import is_main_process


def report_to(cfg: DictConfig) -> list[str]:
    return [] if cfg.wandb.mode == "disabled" else ["wandb"]


def init(cfg: DictConfig, out: Path, job_type: str):
    """Start the W&B run (main process only); returns it, or None when disabled. The mode goes to
    wandb.init, not into $WANDB_MODE: the user's variable stays as they set it for later runs (the
    ablation's summary run reads it)."""
    if cfg.wandb.mode == "disabled" or not is_main_process():
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        name=out.name,
        job_type=job_type,
        dir=str(out),
        mode=cfg.wandb.mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def log(row: dict, step: int) -> None:
    """Log a metrics row to the active W&B run, if any."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].log(row, step=step)


def quiet(trainer) -> None:
    """A Trainer's console: its progress bar (on a terminal) and nothing else. Its log dicts are in
    trainer.state.log_history (the run's metrics.jsonl) and go to W&B; printed, they would land between
    the progress bars (PrinterCallback without a terminal, ProgressCallback.on_log with one)."""
    from transformers import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, *args, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly)


def finish() -> None:
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()
