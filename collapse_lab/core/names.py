"""The lab's shared vocabulary, torch-free: what a stage consumes and produces, and the comparison groups
the report compares regimes within and across (a regime declares them: collapse_lab/stages/stage.py)."""

# What a stage may consume and produce (the orchestrator resolves them in this order).
BASE, RATINGS, REWARD_MODEL, POLICY = "base", "ratings", "reward_model", "policy"
# `reward`: the reward model when the run's config says reward=rm, nothing (the gold rater) otherwise
REWARD = "reward"
# Comparison groups (the report compares regimes within and across them)
OFFLINE, ONLINE, SELECTION = "offline preference", "online RL", "selection"


def get_dotted(d: dict, dotted: str):
    """d["a"]["b"] for "a.b" in a plain nested dict (a run's saved config.yaml), None when missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
