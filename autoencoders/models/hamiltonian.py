"""The Hamiltonian VAE (Caterini, Doucet & Sejdinovic, 2018): a VAE whose posterior draws are moved by tempered
leapfrog steps of the Hamiltonian with potential -log p(x, z)."""

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.errors import UserError
from autoencoders.losses import gaussian_log_prob
from autoencoders.models.vae import VAE


class HamiltonianVAE(VAE):
    """Hamiltonian VAE (Caterini et al., 2018): z_0 ~ q(z|x), the encoder's Gaussian, and a momentum
    rho_0 ~ N(0, I / beta0); then `leapfrog_steps` K times a leapfrog step of H(z, rho) = U(z) + |rho|^2 / 2 with
    U(z) = -log p(x, z) (its gradient in z by autograd, through the decoder), each followed by tempering: rho is
    scaled by sqrt(beta_(k-1) / beta_k) on the paper's quadratic schedule 1 / sqrt(beta_k) = (1 - 1 / sqrt(beta0))
    k^2 / K^2 + 1 / sqrt(beta0) (as in the authors' Gaussian experiment and pythae), which cools the momentum from
    `beta0` (fixed, not learned) to beta_K = 1. The step sizes are learned, one per code dimension, kept in
    (0, `max_step_size`) by a sigmoid and starting at `step_size`, as in the authors' code.

    The leapfrog keeps volume and the tempering scales it by beta0^(d/2), d = latent_dim, so `elbo` is the unbiased
    bound log p(x, z_K) + log N(rho_K; 0, I) - log q(z_0|x) - log N(rho_0; 0, I / beta0) + (d/2) log beta0 (with
    K = 0 the last term is 0: nothing is tempered); `recon` is -log p(x|z_K) and `kl` the rest. `test/nll`
    (and evaluate.py's nll) is the importance-weighted bound with the encoder's Gaussian q(z|x) as the proposal, as
    for a VAE: a bound on log p(x) of this decoder, which leaves the leapfrog out. The code (`encode`) is q's mean.

    Held-out batches run without autograd (in inference mode under Lightning): the leapfrog then takes U's gradient
    on copies, without a graph to train through (torch.compile cannot train it: no double backward)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        max_step_size: float = 0.5,
        beta0: float = 0.5,
        **base: Any,
    ):
        if not step_size < max_step_size:
            raise UserError(
                f"model.step_size={step_size} is not below model.max_step_size={max_step_size}: the leapfrog's step "
                "sizes are learned within (0, max_step_size), starting at step_size. Use e.g. model.step_size=0.1 "
                "and model.max_step_size=0.5."
            )
        super().__init__(image_shape, **base)
        start = torch.full((self.latent_dim,), step_size / max_step_size)
        self.step_logits = nn.Parameter(torch.logit(start))

    def step_sizes(self) -> Tensor:
        """The leapfrog's step size in each code dimension, (D,)."""
        return self.hparams.max_step_size * torch.sigmoid(self.step_logits)

    def tempering(self) -> list[float]:
        """The momentum's factor after each leapfrog step k = 1..K, sqrt(beta_(k-1) / beta_k)."""
        steps, start = self.hparams.leapfrog_steps, self.hparams.beta0**-0.5

        def inverse_root(k: int) -> float:  # 1 / sqrt(beta_k)
            return (1 - start) * (k / steps) ** 2 + start

        return [inverse_root(k) / inverse_root(k - 1) for k in range(1, steps + 1)]

    def potential_grad(self, z: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        """dU/dz at codes (B, D), U(z) = -log p(x|z) - log p(z); with `create_graph`, differentiable in training."""
        z = z if create_graph else z.detach().requires_grad_()
        potential = self.likelihood.nll(self.decoder(z), x) - self.prior_log_prob(z)
        return torch.autograd.grad(potential.sum(), z, create_graph=create_graph)[0]

    def leapfrog(
        self, z: Tensor, rho: Tensor, x: Tensor, create_graph: bool, grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One leapfrog step of H(z, rho) = U(z) + |rho|^2 / 2, before tempering: the new (z, rho) and dU/dz at the
        new z, which the next step starts from (`grad`: dU/dz at z, where known)."""
        step = self.step_sizes()
        rho = rho - step / 2 * (self.potential_grad(z, x, create_graph) if grad is None else grad)
        z = z + step * rho
        grad = self.potential_grad(z, x, create_graph)
        return z, rho - step / 2 * grad, grad

    def flow(self, z: Tensor, rho: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z_K, rho_K) from (z_0, rho_0): K leapfrog steps, each followed by tempering. Differentiable where z_0
        requires gradients (training); elsewhere (held-out batches, a model loaded for inference) detached."""
        training = z.requires_grad
        # held-out batches run without autograd (in inference mode under Lightning): U's gradient is taken at copies
        with contextlib.nullcontext() if training else torch.inference_mode(False), torch.enable_grad():
            if not training:
                z, rho, x = z.clone(), rho.clone(), x.clone()
            grad = None
            for factor in self.tempering():  # tempering scales rho only: U's gradient carries over to the next step
                z, rho, grad = self.leapfrog(z, rho, x, training, grad)
                rho = factor * rho
        return (z, rho) if training else (z.detach(), rho.detach())

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-log p(x|z_K) and the rest of the bound, log q(z_0|x) + log N(rho_0; 0, I / beta0) - log p(z_K) -
        log N(rho_K; 0, I) - the tempering's log-det, per image, nats."""
        mu, logvar = self.posterior(x)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        beta0 = self.hparams.beta0
        rho0 = torch.randn_like(mu) / math.sqrt(beta0)
        z, rho = self.flow(z0, rho0, x)
        log_det = self.latent_dim * sum(map(math.log, self.tempering()))  # the leapfrog's is 0
        momenta = gaussian_log_prob(rho0, torch.zeros_like(rho0), torch.full_like(rho0, -math.log(beta0)))
        momenta = momenta - gaussian_log_prob(rho, torch.zeros_like(rho), torch.zeros_like(rho))
        rest = gaussian_log_prob(z0, mu, logvar) - self.prior_log_prob(z) + momenta - log_det
        return self.likelihood.nll(self.decoder(z), x), rest
