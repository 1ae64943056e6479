"""Per-image negative log-likelihoods and KL terms, all in nats per image."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

RECONSTRUCTION_LOSSES = ("bce", "mse")


def reconstruction_nll(logits: Tensor, x: Tensor, kind: str = "bce") -> Tensor:
    """-log p(x|z) per image, summed over pixels, shape (B,).

    `bce`: Bernoulli likelihood with mean sigmoid(logits). `mse`: Gaussian with mean sigmoid(logits) and unit
    variance, i.e. half the summed squared error plus 0.5*log(2*pi) per pixel, so it is a likelihood too.
    """
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "mse":
        per_pixel = 0.5 * (torch.sigmoid(logits) - x) ** 2 + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; valid: {RECONSTRUCTION_LOSSES}")
    return per_pixel.flatten(1).sum(1)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per input, summed over latent dims, shape (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)
