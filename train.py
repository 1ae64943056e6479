"""Train one autoencoder: `python train.py model=vae latent_dim=16`. See conf/train.yaml for every key."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from autoencoders.errors import UserError  # torch and lightning load only after the config is composed
    from autoencoders.training import train

    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
