"""A VAE whose posterior is a Gaussian transformed by an inverse autoregressive flow (Kingma et al., 2016)."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.losses import gaussian_log_prob
from autoencoders.models.vae import VAE
from autoencoders.nets import MADE


class InverseAutoregressiveFlow(nn.Module):
    """`steps` IAF steps over codes (..., D), each a MADE reading z and the encoder's context h: (m, s) = MADE(z, h),
    sigma = sigmoid(s), z <- sigma * z + (1 - sigma) * m (the paper's numerically stable form). The order of the code's
    dims is reversed between steps. The log-determinant of dz_T/dz_0 is sum log sigma."""

    def __init__(self, dim: int, steps: int, hidden: Sequence[int]):
        super().__init__()
        self.made = nn.ModuleList(MADE(dim, hidden, outputs=2, context_dim=dim) for _ in range(steps))
        for made in self.made:  # s starts near +1.5: sigma near 0.8, each step close to the identity (the paper's)
            nn.init.constant_(made.out.bias[dim:], 1.5)

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """z_T and log|det dz_T/dz_0| per code (...,)."""
        log_det = torch.zeros(z.shape[:-1], device=z.device)
        for i, made in enumerate(self.made):
            if i:
                z = z.flip(-1)
            m, s = made(z, context).unbind(-2)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + nn.functional.logsigmoid(s).sum(-1)
        return z.flip(-1) if len(self.made) % 2 == 0 else z, log_det


class IAFVAE(VAE):
    """VAE with an IAF posterior: the encoder outputs (mu, log-variance, context h), z_0 ~ N(mu, sigma^2) goes through
    `flow_steps` IAF steps (`InverseAutoregressiveFlow`), and log q(z_T|x) = log N(z_0; mu, sigma^2) - log|det|. The
    KL has no closed form: `kl` is the one-sample log q(z|x) - log p(z), p = N(0, I). The code (`encode`) is the flow
    applied to mu; a classifier built from this encoder reads mu, the net's first outputs."""

    code_multiplier = 3
    analytic_kl = False

    def __init__(
        self, image_shape: Sequence[int], flow_steps: int = 2, flow_widths: Sequence[int] = (64, 64), **base: Any
    ):
        super().__init__(image_shape, **base)
        self.flow = InverseAutoregressiveFlow(self.latent_dim, flow_steps, tuple(flow_widths))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian before the flow, (mu, log-variance)."""
        return self.encoder(x)[:, : 2 * self.latent_dim].chunk(2, dim=1)

    def encode(self, x: Tensor) -> Tensor:
        mu, _, h = self.encoder(x).chunk(3, dim=1)
        return self.flow(mu, h)[0]

    def latent_draws(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        mu, logvar, h = self.encoder(x).chunk(3, dim=1)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, device=mu.device)
        z, log_det = self.flow(z0, h.expand(n, *h.shape))
        return z, gaussian_log_prob(z0, mu, logvar) - log_det - self.prior_log_prob(z)
