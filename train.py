"""Train one autoencoder: `python train.py model=vae latent_dim=16`. See conf/train.yaml for every key."""

import hydra
from omegaconf import DictConfig

import autoencoders  # noqa: F401  (registers the config schemas and resolvers; imports no torch)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `cfg.objective` (null: the model's selection metric, e.g. val/elbo) for sweepers such as Optuna; None
    for a failed sweep job."""
    from autoencoders.cli import reported_failures, stops_kept

    with stops_kept():  # SIGTERM's stop, even where the code it landed in made another error of it
        from autoencoders.sweeps import objective
        from autoencoders.training import train  # torch and lightning load only after the config is composed

    with reported_failures():  # bad input: exit 2 in a single run; in a sweep, recorded while the other jobs go on
        return objective(train(cfg), cfg)
    return None


if __name__ == "__main__":
    import sys

    from autoencoders.cli import refuse_unreadable_overrides, stopped_by_signals

    refuse_unreadable_overrides(sys.argv[1:])  # a value unquoted: say how to quote it (exit 2)
    with stopped_by_signals():  # Ctrl-C or SIGTERM: one `error:` line, exit 130 or 143
        main()
