"""Autoencoders: a Lightning + Hydra experiment framework. Heavy imports happen on first use, not at import."""

from omegaconf import OmegaConf

from autoencoders.rundirs import run_name

OmegaConf.register_new_resolver("run_name", run_name, replace=True)  # conf/train.yaml's run and job dir names


def load(path):
    """Rebuild the right LightningModule (AE, VAE, ...) for any checkpoint written by train.py."""
    from autoencoders.checkpoints import load

    return load(path)
