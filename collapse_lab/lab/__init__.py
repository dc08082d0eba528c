"""Layer 7, the top: the lab's orchestration (ablate, sweep, budget) and the report."""
