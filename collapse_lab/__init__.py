"""collapse-lab: does RLHF with PPO cause mode collapse? One base, matched recipes, one evaluator."""

__version__ = "0.1.0"
