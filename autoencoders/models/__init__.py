"""The models: each an objective over pluggable nets (nets.py). Importing this package registers every model class
in MODELS, by the name its checkpoints record."""

from autoencoders.checkpoints import MODELS
from autoencoders.models.adversarial import AAE, VAEGAN, FactorVAE
from autoencoders.models.ae import AE, DAE, RAE, WAE, SparseAE
from autoencoders.models.base import minimised
from autoencoders.models.classifier import Classifier
from autoencoders.models.hamiltonian import HamiltonianVAE
from autoencoders.models.hierarchical import HVAE
from autoencoders.models.iaf import IAFVAE
from autoencoders.models.nf import NormalizingFlowVAE
from autoencoders.models.semi import M2
from autoencoders.models.svae import HypersphericalVAE
from autoencoders.models.vae import IWAE, MSSSIMVAE, PIWAE, VAE, BetaTCVAE, CapacityVAE, InfoVAE
from autoencoders.models.vamp import VampVAE
from autoencoders.models.vq import FSQVAE, VQVAE

__all__ = ["AE", "DAE", "SparseAE", "WAE", "RAE", "AAE", "VAE", "IWAE", "BetaTCVAE", "InfoVAE", "VampVAE", "IAFVAE"]
__all__ += ["CapacityVAE", "NormalizingFlowVAE", "HVAE", "FactorVAE", "VQVAE", "FSQVAE", "M2", "Classifier"]
__all__ += ["PIWAE", "MSSSIMVAE", "VAEGAN", "HypersphericalVAE", "HamiltonianVAE", "MODELS", "minimised"]
