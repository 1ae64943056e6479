"""Terms on the latent code, in nats: KL divergences and their decomposition, Gaussian log-densities, and the MMD of
the codes to the prior (the decoder's likelihoods are in likelihoods.py)."""

import math

import torch
from torch import Tensor


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per input, summed over latent dims, shape (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def imq_mmd(z: Tensor, prior: Tensor, scales: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)) -> Tensor:
    """Unbiased estimate of MMD^2 between the codes `z` (n, D) and draws `prior` (n, D) of N(0, I), with the inverse
    multiquadric kernel k(a, b) = C / (C + |a - b|^2) summed over C = s * 2D for each of `scales` (Tolstikhin et al.,
    2018: 2D is E|a - b|^2 under the prior)."""
    n, dim = z.shape

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        distances = torch.cdist(a, b).pow(2)
        return sum(c / (c + distances) for c in (s * 2 * dim for s in scales))

    off_diagonal = 1 - torch.eye(n, device=z.device)
    within = ((kernel(z, z) + kernel(prior, prior)) * off_diagonal).sum() / (n * (n - 1))
    return within - 2 * kernel(z, prior).mean()


def kl_decomposition(z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int) -> dict[str, Tensor]:
    """Chen et al.'s (2018) decomposition of the KL term of a batch's codes z ~ q(z|x) (B, D), batch means in nats:
    index-code mutual information `mi` = E[log q(z|x) - log q(z)], total correlation `tc` = E[log q(z) - sum_d
    log q(z_d)] and dimension-wise KL `dim_kl` = E[sum_d log q(z_d) - log p(z)].

    The aggregate posterior q(z) = 1/N sum_n q(z|x_n) over the N = `dataset_size` training images is estimated from
    the batch, weighting each code's own posterior 1/N and letting the batch's B - 1 others stand for the remaining
    N - 1 images, (N - 1)/(N (B - 1)) each: exact when the batch is the whole set. (The form with weight 1/(N B) for
    every term, found in some implementations, biases log q(z) by -log N and the total correlation by (D-1) log N.)"""
    batch, n = len(z), max(dataset_size, len(z))
    # log q(z_i,d | x_j) for every code i, posterior j and dimension d: (B, B, D)
    pairwise = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mu[None]) ** 2 / logvar.exp()[None])
    others = math.log((n - 1) / (n * (batch - 1))) if batch > 1 else -math.inf
    log_weight = torch.full((batch, batch), others, device=z.device).fill_diagonal_(-math.log(n))
    log_qz = torch.logsumexp(pairwise.sum(2) + log_weight, 1)
    log_qz_dims = torch.logsumexp(pairwise + log_weight[..., None], 1).sum(1)
    log_qz_x = gaussian_log_prob(z, mu, logvar)
    log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    return {
        "mi": (log_qz_x - log_qz).mean(),
        "tc": (log_qz - log_qz_dims).mean(),
        "dim_kl": (log_qz_dims - log_pz).mean(),
    }
