"""A VAE whose posterior is a Gaussian transformed by planar and radial flows (Rezende & Mohamed, 2015)."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.losses import gaussian_log_prob
from autoencoders.models.vae import VAE


class PlanarFlow(nn.Module):
    """f(z) = z + u' tanh(w.z + b), with u' = u + (m(w.u) - w.u) w / |w|^2, m(a) = -1 + softplus(a), so that w.u' >= -1
    and f is invertible (the paper's appendix A.1); log|det df/dz| = log|1 + u'.psi(z)|, psi(z) = tanh'(w.z + b) w."""

    def __init__(self, dim: int):
        super().__init__()
        self.u, self.w = nn.Parameter(torch.randn(dim) * 0.01), nn.Parameter(torch.randn(dim) / dim**0.5)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        w, u = self.w, self.u
        wu, m = w @ u, F.softplus(w @ u) - 1  # m: w.u' after the correction
        u = u + (m - wu) * w / (w @ w).clamp_min(1e-12)
        t = torch.tanh(z @ w + self.b)
        # 1 + u'.psi = 1 + (1 - t^2) m = t^2 + (1 - t^2) softplus(w.u): a sum of non-negative terms, no cancellation
        return z + u * t.unsqueeze(-1), torch.log(t**2 + (1 - t**2) * (m + 1))


class RadialFlow(nn.Module):
    """f(z) = z + beta h(alpha, r) (z - z0), r = |z - z0|, h = 1 / (alpha + r), with alpha = softplus(.) > 0 and
    beta = -alpha + softplus(.) >= -alpha, so that f is invertible (appendix A.2); log|det df/dz| =
    (d - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)."""

    def __init__(self, dim: int):
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim) * 0.01)
        self.alpha_raw, self.beta_raw = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.alpha_raw)
        beta = -alpha + F.softplus(self.beta_raw)
        diff = z - self.z0
        r = diff.norm(dim=-1)
        h = 1 / (alpha + r)
        beta_h = beta * h
        log_det = (z.shape[-1] - 1) * torch.log1p(beta_h) + torch.log1p(beta * alpha * h**2)  # 1 + bh + bh'r
        return z + beta_h.unsqueeze(-1) * diff, log_det


FLOWS = {"planar": PlanarFlow, "radial": RadialFlow}


class NormalizingFlowVAE(VAE):
    """VAE with a normalizing-flow posterior: z_0 ~ N(mu, sigma^2) from the encoder goes through the `flows` in
    order (`planar`, `radial`), and log q(z_K|x) = log N(z_0; mu, sigma^2) - sum of their log|det|. The flows'
    parameters are learned for the whole data set (as pythae's VAE_NF), not output by the encoder per image as in
    the paper. The KL has no closed form: `kl` is the one-sample log q(z|x) - log p(z). The code (`encode`) is the
    flows applied to mu; a classifier built from this encoder reads mu."""

    analytic_kl = False

    def __init__(self, image_shape: Sequence[int], flows: Sequence[str] = ("planar", "planar"), **base: Any):
        super().__init__(image_shape, **base)
        self.flows = nn.ModuleList(FLOWS[name](self.latent_dim) for name in flows)

    def transform(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z_K and the sum of the flows' log|det| per code (...,)."""
        log_det = torch.zeros(z.shape[:-1], device=z.device)
        for flow in self.flows:
            z, step = flow(z)
            log_det = log_det + step
        return z, log_det

    def encode(self, x: Tensor) -> Tensor:
        return self.transform(self.posterior(x)[0])[0]

    def latent_draws(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        mu, logvar = self.posterior(x)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, device=mu.device)
        z, log_det = self.transform(z0)
        return z, gaussian_log_prob(z0, mu, logvar) - log_det - self.prior_log_prob(z)
