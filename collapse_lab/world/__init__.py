"""Layer 3: the embedded world (corpus, prompts, the gold rater) and the bandit world."""
