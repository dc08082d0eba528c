"""The RATING BUDGET: how many samples the rater scored for a run, and whether two runs are matched.

Every regime's manifest.json carries `samples_scored` (the ratings it consumed, including those its
reward model was trained on), `steps`, `tokens_trained`, `wall_time_s` and `base_path`. Two runs are
MATCHED when they start from the same base and consumed the same number of ratings. Best-of-k
(`ratings_per_query` in its manifest) spends its k ratings per query at inference and none in
training: it is never matched with a trained regime, and the message says why.

With the default recipes: FeedME (sft.rounds = 1) and the reward model behind `reward=rm` PPO both
consume the ratings stage's ratings.prompts x ratings.samples_per_prompt samples (registry.planned_budget:
each regime declares its rating budget). Torch-free: the report reads budgets from stored manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from collapse_lab.core.config import read_record, rerun_repair

BUDGET_KEYS = ("samples_scored", "steps", "tokens_trained", "wall_time_s")
Run = Union[str, Path, dict]


def budget(run: Run) -> dict[str, Any]:
    """The budget counters of a run (a run directory or its manifest dict); missing ones are None."""
    manifest = _manifest(run)
    return {k: manifest.get(k) for k in BUDGET_KEYS + ("base_path", "stage", "ratings_per_query")}


def compare(a: Run, b: Run) -> tuple[bool, str]:
    """(matched, one line): same base and the same number of samples scored."""
    ba, bb = budget(a), budget(b)
    na, nb = _name(a, ba), _name(b, bb)
    for x, n in ((ba, na), (bb, nb)):
        if x["ratings_per_query"]:
            return False, (f"not comparable: {n} is best-of-{x['ratings_per_query']}, which rates "
                           f"{x['ratings_per_query']} samples per query at inference and none in training")
        if x["samples_scored"] is None:
            return False, f"unknown budget: {n} records no samples_scored"
    if ba["base_path"] != bb["base_path"]:
        return False, f"NOT matched: different bases ({na}: {ba['base_path']}, {nb}: {bb['base_path']})"
    sa, sb = ba["samples_scored"], bb["samples_scored"]
    if sa == sb:
        return True, f"matched: {na} and {nb} both scored {sa} samples"
    ratio = max(sa, sb) / max(1, min(sa, sb))
    return False, f"NOT matched: {na} scored {sa} samples, {nb} scored {sb} ({ratio:.3g}x)"


def _manifest(run: Run) -> dict:
    if isinstance(run, dict):
        return run
    manifest = read_record(Path(run) / "manifest.json", rerun_repair(run))
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {run}")
    return manifest


def _name(run: Run, b: dict) -> str:
    return Path(run).name if not isinstance(run, dict) else (b.get("stage") or "run")
