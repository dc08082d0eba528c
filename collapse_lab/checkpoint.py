"""Run directories' manifest.json: status, budget counters, timings, provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from collapse_lab.config import REPO_ROOT

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
