"""Autoencoders: a Lightning + Hydra experiment framework. Heavy imports happen on first use, not at import."""


def load(path):
    """Rebuild the right LightningModule (AE, VAE, ...) for any checkpoint written by train.py."""
    from autoencoders.checkpoints import load

    return load(path)
