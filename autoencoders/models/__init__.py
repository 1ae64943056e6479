"""The models: each an objective over pluggable nets (nets.py). Importing this package registers every model class
in MODELS, by the name its checkpoints record."""

from autoencoders.checkpoints import MODELS
from autoencoders.models.ae import AE, DAE, WAE, SparseAE
from autoencoders.models.base import minimised
from autoencoders.models.classifier import Classifier
from autoencoders.models.semi import M2
from autoencoders.models.vae import IWAE, VAE, BetaTCVAE
from autoencoders.models.vq import VQVAE

__all__ = ["AE", "DAE", "SparseAE", "WAE", "VAE", "IWAE", "BetaTCVAE", "VQVAE", "M2", "Classifier", "MODELS"]
__all__ += ["minimised"]
