"""KL terms and Gaussian log-densities of the latent code, in nats (the decoder's likelihoods are in likelihoods.py)."""

import math

from torch import Tensor


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per input, summed over latent dims, shape (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)
