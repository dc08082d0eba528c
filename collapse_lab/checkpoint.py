"""Run directories' manifest.json: status, budget counters, timings, provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from collapse_lab.config import REPO_ROOT, save_config

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "trl", "peft", "datasets", "hydra-core", "wandb")


def git_commit() -> Optional[str]:
    """The lab's HEAD commit, with '+dirty' when the work tree has uncommitted changes."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    f = Path(path) / "manifest.json"
    return json.loads(f.read_text()) if f.exists() else None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Atomic: a reader (or a kill) never sees half a manifest."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / "manifest.json")


def already_finished(out: Path, summary: str) -> bool:
    """True when `out` holds a finished run; then print `<out>: already finished (<summary>); nothing to do`,
    `summary` a format string over the manifest's fields, e.g. "{steps} steps, {wall_time_s:.0f} s"."""
    manifest = read_manifest(out)
    if not manifest or manifest.get("status") != "finished":
        return False
    print(f"{out}: already finished ({summary.format_map(manifest)}); nothing to do")
    return True


def start_run(cfg: DictConfig, out: Path, stage: str, previous: dict[str, Any] | None = None, **fields) -> None:
    """A stage's run starts in `out`: the resolved config.yaml, and manifest.json with status running, the stage
    and `fields`, over `previous` (an interrupted run's manifest, whose counters a resumed run continues)."""
    save_config(cfg, out)
    write_manifest(out, {**(previous or {}), "stage": stage, "status": "running", **fields})
