"""PPO for language models: `accelerate launch train/ppo.py recipe=kl0.1 [key=value ...]`.

The update rule, top to bottom: collapse_lab/ppo.py.
"""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.ppo import train_ppo  # torch/transformers load only once the config is valid

    return train_ppo(cfg)


if __name__ == "__main__":
    cli("lab", main)
