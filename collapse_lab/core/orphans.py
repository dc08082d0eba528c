"""Child processes that end with their parent, even one killed with -9 (which runs no cleanup: its spawned
workers would run on under PID 1, and multiprocessing's resource_tracker with them, which exits once the last
process holding its pipe is gone). Standard library only: it runs in a spawned worker before its imports."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# the PID of the process whose spawned workers must end with it (set by `spawning_workers`, inherited by them)
PARENT = "COLLAPSE_LAB_PARENT_PID"


def spawning_workers() -> None:
    """Called by a process before it spawns workers: they end with it (tie_spawned_worker, in their
    collapse_lab/__init__.py, as soon as their interpreter imports the lab)."""
    os.environ[PARENT] = str(os.getpid())


def tie_spawned_worker() -> None:
    """In a spawned worker of a lab process (spawning_workers), first thing: end with that parent. A parent
    killed before this worker even started leaves it a different parent: it ends at once. Its own workers
    are then tied to it."""
    parent = os.environ.get(PARENT)
    if parent and parent.isdigit():
        os.environ[PARENT] = str(os.getpid())
        die_with_parent(int(parent))


def die_with_parent(parent: int) -> None:
    """End this process when `parent` ends: Linux's parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL), and
    everywhere a thread that checks the parent once a second (a dead parent's children get a new one)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # died before the signal was set
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
