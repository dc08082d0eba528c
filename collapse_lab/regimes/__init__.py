"""Layer 6: the regimes, one file each with its update rule top to bottom, and the registry that collects them."""
