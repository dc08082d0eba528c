"""Any regime by its recipe: `python train/regime.py recipe=<name> [key=value ...]` runs the regime module the
recipe names (its `regime.kind`), upstream stages first. train/<kind>.py (ppo, sft, dpo, ...) do the same for
their own kind, and refuse another kind's recipe."""

from collapse_lab.regimes import registry
from collapse_lab.core.config import ConfigError, cli


def main(cfg):
    if cfg.regime.kind is None:
        raise ConfigError(f"give a recipe: recipe=<one of {', '.join(registry.REGIMES)}>")
    return registry.run(cfg.regime.kind, cfg)


if __name__ == "__main__":
    cli("lab", main)
