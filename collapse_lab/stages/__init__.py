"""Layer 5: the stage interface and bookkeeping, and the upstream stages every regime consumes (base, ratings, reward model)."""
