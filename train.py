"""Train one autoencoder: `python train.py model=vae latent_dim=16`. See conf/train.yaml for every key."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `cfg.objective` (e.g. val/loss) for sweepers such as Optuna; None for a failed sweep job."""
    from autoencoders.sweeps import objective, reported_failures
    from autoencoders.training import train  # torch and lightning load only after the config is composed

    with reported_failures():  # bad input: exit 2 in a single run; in a sweep, recorded while the other jobs go on
        return objective(train(cfg), cfg.objective)
    return None


if __name__ == "__main__":
    main()
