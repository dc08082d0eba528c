"""Train the reward model on the ratings (TRL RewardTrainer): `python train/reward.py [reward_model.epochs=2 ...]`.
`reward=rm` PPO runs train it on the way when reward_model_path is not given."""

from collapse_lab.config import cli


def main(cfg):
    from collapse_lab.reward_model import train_reward_model  # torch/transformers load only once the config is valid

    return train_reward_model(cfg)


if __name__ == "__main__":
    cli("lab", main)
