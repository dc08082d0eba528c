"""collapse-lab: does RLHF with PPO cause mode collapse? One base, matched recipes, one evaluator."""

import sys

from collapse_lab.orphans import tie_spawned_worker  # the standard library only: cheap here

__version__ = "0.1.0"

_mp = sys.modules.get("multiprocessing.process")
if _mp is not None and getattr(_mp.current_process(), "_inheriting", False):
    # a spawned worker being prepared (the ablation's pool), tied to its parent's life here, before its imports
    # (seconds of torch): a parent killed meanwhile would leave it running for good (collapse_lab/orphans.py)
    tie_spawned_worker()
