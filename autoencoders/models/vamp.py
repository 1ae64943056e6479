"""A VAE with the VampPrior (Tomczak & Welling, 2018): the prior is the mixture of the posteriors of learned
pseudo-inputs."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.losses import gaussian_log_prob
from autoencoders.models.vae import VAE
from autoencoders.samplers import GMMSampler


class MixturePrior(GMMSampler):
    """A Gaussian mixture given by a model (its VampPrior), not fitted to codes."""

    needs_fit = False


class VampVAE(VAE):
    """VAE whose prior is p(z) = 1/K sum_k q(z | u_k), the encoder's posteriors at K = `pseudo_inputs` learned
    pseudo-images u_k (kept in [0, 1] by a hard tanh, as in the paper), trained with the rest of the model. The KL
    has no closed form: `kl` is the one-sample log q(z|x) - log p(z). Samples come from that mixture."""

    analytic_kl = False

    def __init__(self, image_shape: Sequence[int], pseudo_inputs: int = 50, **base: Any):
        super().__init__(image_shape, **base)
        self.pseudo_inputs = nn.Parameter(torch.rand(pseudo_inputs, *self.image_shape))

    def prior_components(self) -> tuple[Tensor, Tensor]:
        """The mixture's means and log-variances, (K, D) each."""
        return self.posterior(nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        mu, logvar = self.prior_components()
        log_components = gaussian_log_prob(z.unsqueeze(-2), mu, logvar)  # (..., K)
        return torch.logsumexp(log_components, -1) - math.log(len(mu))

    @torch.no_grad()
    def prior_sampler(self) -> MixturePrior:
        mu, logvar = (t.detach().double().cpu() for t in self.prior_components())
        weights = torch.full((len(mu),), 1 / len(mu), dtype=torch.float64)
        state = {"weights": weights, "means": mu, "scale_tril": torch.diag_embed(torch.exp(0.5 * logvar))}
        return MixturePrior(self.latent_dim, len(mu)).load_state_dict(state)
