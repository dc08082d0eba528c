"""Run directories' shared bookkeeping: manifest.json (status, budget counters, timings, provenance), the
run's lock, and the atomic publication of its final files.

Every stage starts with `already_finished` (which takes the run directory's lock) and `start_run`, saves its
final files with `publish`, and ends by writing a manifest with status finished (which releases the lock).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from collapse_lab.core.config import REPO_ROOT, ConfigError, read_record, rerun_repair, save_config
from collapse_lab.core.console import note
from collapse_lab.core.distributed import is_main_process

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
    """The run directory's manifest.json, None when there is none; a damaged one is a one-line ConfigError
    naming it and its repair (config.read_record)."""
    return read_record(Path(path) / "manifest.json", rerun_repair(path))


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Atomic: a reader (or a kill) never sees half a manifest. A manifest saying the run ended (finished,
    failed) releases the run directory's lock: it is the run's last write."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / "manifest.json")
    if manifest.get("status") in ("finished", "failed"):
        unlock_run(path)


def already_finished(out: Path, summary: str, check: Optional[Callable[[], None]] = None) -> bool:
    """True when `out` holds a finished run; then print `<out>: already finished (<summary>); nothing to do`,
    `summary` a format string over the manifest's fields, e.g. "{steps} steps, {wall_time_s:.0f} s".

    `check()` runs once this process holds `out`'s lock, before the manifest is read: the stage's config
    against the directory's config.yaml (config.same_config), which a run holding the lock until now may
    have written. A finished run must be whole: its bookkeeping files parse and every file its manifest
    lists is there (a ConfigError naming what is damaged or missing, and the repair, otherwise).
    Otherwise this process now holds `out`'s lock (lock_run) until its manifest says the run ended."""
    lock_run(out)
    try:
        if check is not None:
            check()
        manifest = read_manifest(out)
        if not manifest or manifest.get("status") != "finished":
            return False
        check_whole(out, manifest)
    except BaseException:
        unlock_run(out)
        raise
    unlock_run(out)
    note(f"{out}: already finished ({summary.format_map(manifest)}); nothing to do")
    return True


def check_whole(out: Path, manifest: dict[str, Any]) -> None:
    """A finished run directory is whole: config.yaml and metrics.jsonl parse, and the files its manifest
    lists (`files`, written when it finished: weights, tokenizer, data) are all there."""
    out = Path(out)
    for name in ("config.yaml", "metrics.jsonl"):
        read_record(out / name, rerun_repair(out))
    missing = [f for f in manifest.get("files", []) if not (out / f).exists()]
    if "files" not in manifest and (out / "config.json").is_file() and not any(out.glob("*.safetensors")):
        missing = ["model.safetensors"]  # a manifest from before `files`: a model directory without weights
    if missing:
        raise ConfigError(f"{out}: its manifest says finished but {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''} is missing; {rerun_repair(out)}")


def run_files(out: Path) -> list[str]:
    """The files and directories a finished run keeps (the manifest lists them; check_whole checks them)."""
    skip = {"manifest.json", "manifest.json.tmp", "trainer", "checkpoints", ".publish", "wandb", "eval"}
    return sorted(f.name for f in Path(out).iterdir() if f.name not in skip and not f.name.endswith(".tmp"))


# ------------------------------------------------------------------------------ the run's lock

_held: dict[Path, FileLock] = {}  # run directories this process holds


def _lock_file(out: Path) -> Path:
    """checkpoints/.locks/<stage>-<name>.lock: outside the run directory (taking the lock creates none) and
    outside the stage's directory (whose listing is the runs)."""
    return out.parent.parent / ".locks" / f"{out.parent.name}-{out.name}.lock"


def lock_run(out: Path) -> None:
    """Hold `out` for this process: a second process on the same run directory waits here (saying which
    PID holds it) and then finds the run finished, or resumes what the holder left. The lock is the kernel's
    (flock), so a killed holder's lock is gone with it. Under `accelerate launch` the main process holds
    it for all the launch's processes. Reentrant within a process (an ablation meets a stage twice)."""
    out = Path(out).absolute()
    if not is_main_process() or out in _held:
        return
    path = _lock_file(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = path.read_text().strip() if path.exists() else ""
        print(f"{out}: in use by PID {holder or '?'}; waiting for it", file=sys.stderr, flush=True)
        lock.acquire()
    path.write_text(f"{os.getpid()}\n")  # who holds it, for the message above (the file itself is the lock)
    _held[out] = lock


def unlock_run(out: Path) -> None:
    lock = _held.pop(Path(out).absolute(), None)
    if lock is not None:
        lock.release(force=True)


# ------------------------------------------------------------------------------ final files

# tests only: "save:<stage>" kills this process in the middle of publish(), "step:<stage>:<n>" after step n
FAULT = "COLLAPSE_LAB_FAULT"


def fault(point: str) -> None:
    """Tests only: SIGKILL this process (a kill -9 at a known moment) when $COLLAPSE_LAB_FAULT names `point`."""
    if os.environ.get(FAULT) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def publish(out: Path, save: Callable[[Path], Any]) -> None:
    """Write a stage's final files with `save(tmp)` into a fresh temporary directory inside `out`, then rename
    each into `out` (os.replace: a file, e.g. the tokenizer a resumed run reads, is there whole or not at all,
    never rewritten in place). A kill before the manifest says finished leaves the run to be redone or resumed,
    and the next publish starts over; so a stage writes its finished manifest only after this returns."""
    out = Path(out)
    tmp = out / ".publish"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    for i, f in enumerate(sorted(tmp.iterdir())):
        if i == 1:
            fault(f"save:{out.parent.name}")  # half the files renamed: the worst moment to die
        target = out / f.name
        if f.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(f, target)
    tmp.rmdir()


def start_run(cfg: DictConfig, out: Path, stage: str, previous: dict[str, Any] | None = None, **fields) -> None:
    """A stage's run starts in `out`: the resolved config.yaml, and manifest.json with status running, the stage
    and `fields`, over `previous` (an interrupted run's manifest, whose counters a resumed run continues)."""
    save_config(cfg, out)
    write_manifest(out, {**(previous or {}), "stage": stage, "status": "running", **fields})
