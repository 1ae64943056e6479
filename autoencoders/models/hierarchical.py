"""A VAE with two stochastic layers, inferred top-down as in the Ladder VAE (Sønderby et al., 2016)."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.losses import gaussian_log_prob
from autoencoders.models.vae import VAE
from autoencoders.samplers import Sampler


def precision_weighted(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and log-variance of the normalised product of the Gaussians N(mu_a, var_a) and N(mu_b, var_b)."""
    precision_a, precision_b = torch.exp(-logvar_a), torch.exp(-logvar_b)
    precision = precision_a + precision_b
    return (mu_a * precision_a + mu_b * precision_b) / precision, -torch.log(precision)


class AncestralPrior(Sampler):
    """A two-layer model's prior over its codes z1: z2 ~ N(0, I), then z1 ~ p(z1 | z2)."""

    def __init__(self, model: "HVAE"):
        super().__init__(model.latent_dim)
        self.model = model

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator else None
        z2 = torch.randn(n, self.model.top_dim, generator=generator, device=device)
        eps = torch.randn(n, self.dim, generator=generator, device=device)
        mu, logvar = self.model.top_down(z2.to(self.model.device))
        return (mu + torch.exp(0.5 * logvar) * eps.to(mu.device)).to(eps.device)


class HVAE(VAE):
    """A Ladder VAE with two stochastic layers: p(z2) = N(0, I), p(z1 | z2) a Gaussian from an MLP (`top_down`),
    p(x | z1) the decoder. Inference runs bottom-up, then top-down: the encoder gives a Gaussian over z1 from the
    image alone (`posterior`), an MLP on it gives q(z2 | x), and q(z1 | x, z2) is the precision-weighted product of
    the encoder's Gaussian and p(z1 | z2). `kl` is the one-sample log q(z1, z2 | x) - log p(z1, z2), and `test/nll`
    the importance-weighted bound over both layers. The code (`encode`) is the mean of q(z1 | x, z2) at z2's
    posterior mean; a classifier built from this encoder reads the bottom-up mean, the net's first outputs.

    `top_latent_dim` (null: half of latent_dim, at least 1) is z2's size, `hidden` the width of the two MLPs."""

    analytic_kl = False

    def __init__(self, image_shape: Sequence[int], top_latent_dim: int | None = None, hidden: int = 128, **base: Any):
        super().__init__(image_shape, **base)
        self.top_dim = top_latent_dim or math.ceil(self.latent_dim / 2)
        dim = self.latent_dim
        self.bottom_up = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.top_dim))
        self.prior_net = nn.Sequential(nn.Linear(self.top_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * dim))

    def top_posterior(self, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        """q(z2 | x) from the encoder's Gaussian over z1."""
        return self.bottom_up(torch.cat([mu, logvar], -1)).chunk(2, dim=-1)

    def top_down(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        """p(z1 | z2): its mean and log-variance."""
        return self.prior_net(z2).chunk(2, dim=-1)

    def encode(self, x: Tensor) -> Tensor:
        mu, logvar = self.posterior(x)
        return precision_weighted(mu, logvar, *self.top_down(self.top_posterior(mu, logvar)[0]))[0]

    def latent_draws(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        mu, logvar = self.posterior(x)
        mu2, logvar2 = self.top_posterior(mu, logvar)
        z2 = mu2 + torch.exp(0.5 * logvar2) * torch.randn(n, *mu2.shape, device=mu2.device)
        prior_mu, prior_logvar = self.top_down(z2)
        mu1, logvar1 = precision_weighted(mu, logvar, prior_mu, prior_logvar)
        z1 = mu1 + torch.exp(0.5 * logvar1) * torch.randn_like(mu1)
        log_q = gaussian_log_prob(z2, mu2, logvar2) + gaussian_log_prob(z1, mu1, logvar1)
        log_p = self.prior_log_prob(z2) + gaussian_log_prob(z1, prior_mu, prior_logvar)
        return z1, log_q - log_p

    def prior_sampler(self) -> AncestralPrior:
        return AncestralPrior(self)
