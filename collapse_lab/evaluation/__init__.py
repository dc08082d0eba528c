"""Layer 4: the shared evaluator, its metrics (pure functions), the closed forms it compares with, curves along training."""
