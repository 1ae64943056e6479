"""Gaussian-latent VAEs: VAE (β-VAE with kl_weight=β), IWAE, β-TCVAE."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from autoencoders.errors import UserError, check_positive
from autoencoders.likelihoods import bits_per_dim
from autoencoders.losses import gaussian_log_prob, kl_decomposition, kl_divergence
from autoencoders.models.ae import AE
from autoencoders.optim import OptimizerFactory


class VAE(AE):
    """Gaussian-latent VAE. Encoder outputs (mu, log-variance); loss = recon + beta*KL, beta warmed up linearly.

    The best checkpoint is the one with the highest `val/elbo` (KL weight 1, whatever the training weight). The test
    split also gets `test/nll`, the importance-weighted bound with `nll_samples` samples, and `test/bpd`.
    """

    code_multiplier = 2
    selection = ("val/elbo", "max")
    bounds_images = True  # elbo and log_likelihood bound log p(x) of images (M1+M2's: of another model's codes)

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 16,
        arch: str = "mlp",
        widths: Sequence[int] | None = None,
        likelihood: str = "bernoulli",
        optimizer: OptimizerFactory | None = None,
        scheduler: dict[str, Any] | None = None,
        kl_weight: float = 1.0,
        kl_warmup_epochs: int = 0,
        nll_samples: int = 100,
    ):
        if not 0 <= kl_weight < math.inf:
            raise UserError(f"kl_weight={kl_weight} is no weight: use a finite kl_weight>=0 (1 is the standard VAE).")
        if kl_warmup_epochs < 0:
            raise UserError(
                f"model.kl_warmup_epochs={kl_warmup_epochs!r} is not a number of epochs. Use 0 (no warm-up) or more."
            )
        if nll_samples < 1:
            raise UserError(f"model.nll_samples={nll_samples!r} must be a positive integer, e.g. 100.")
        super().__init__(image_shape, latent_dim, arch, widths, likelihood, optimizer, scheduler)
        self.steps_per_epoch: float | None = None  # optimizer steps per epoch, once training starts (warm-up)

    def on_train_start(self) -> None:
        # under gradient accumulation fewer than batches; inf for a training set without a length
        steps = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        self.steps_per_epoch = math.ceil(steps) if math.isfinite(steps) else steps

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One-sample reconstruction NLL and analytic KL per image (nats), via the reparameterization trick."""
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.likelihood.nll(self.decoder(z), x), kl_divergence(mu, logvar)

    def elbo(self, x: Tensor) -> Tensor:
        """Evidence lower bound per image in nats (always with KL weight 1)."""
        recon, kl = self.elbo_terms(x)
        return -(recon + kl)

    def log_weights(self, x: Tensor, n: int) -> Tensor:
        """log p(x, z_i) - log q(z_i|x) for n draws z_i ~ q(z|x) of each image, nats, shape (n, B)."""
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, device=mu.device)  # (n, B, D)
        log_px_z = -self.likelihood.nll(self.decoder(z.flatten(0, 1)), x.repeat(n, 1, 1, 1)).view(n, -1)
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        return log_px_z + log_pz - gaussian_log_prob(z, mu, logvar)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, k: int = 1000, chunk: int = 100) -> Tensor:
        """Importance-weighted bound log p(x) >= log mean_k p(x, z_k)/q(z_k|x), nats per image, shape (B,).

        Samples are drawn `chunk` at a time so memory stays bounded for large k.
        """
        log_w = torch.cat([self.log_weights(x, min(chunk, k - start)) for start in range(0, k, chunk)])
        return torch.logsumexp(log_w, 0) - math.log(k)

    def kl_beta(self) -> float:
        """kl_weight, ramped linearly from 0 over kl_warmup_epochs of training steps."""
        warmup = self.hparams.kl_warmup_epochs
        if not warmup or self.steps_per_epoch is None:  # not in training (evaluate.py): the full weight
            return self.hparams.kl_weight
        progress = self.global_step / max(1, warmup * self.steps_per_epoch)
        return self.hparams.kl_weight * min(1.0, progress)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        recon, kl = (t.mean() for t in self.elbo_terms(x))
        return {"loss": recon + self.kl_beta() * kl, "recon": recon, "kl": kl, "elbo": -(recon + kl)}

    def test_terms(self, x: Tensor) -> dict[str, Tensor]:
        nll = -self.log_likelihood(x, self.hparams.nll_samples).mean()
        terms = {"nll": nll, "nll_k": torch.tensor(float(self.hparams.nll_samples), device=nll.device)}
        if self.likelihood.discrete:  # bits per dimension of a probability mass; a density's would be no code length
            terms["bpd"] = bits_per_dim(nll, math.prod(self.image_shape))
        return terms


class IWAE(VAE):
    """Importance-weighted autoencoder (Burda et al., 2016): a VAE trained on the k-sample bound, `loss` = -log
    mean_k p(x, z_k)/q(z_k|x). Its checkpoint is chosen on that bound (`val/iwae`), the objective it trains; its
    one-sample `elbo` and `test/nll` are a VAE's."""

    selection = ("val/iwae", "max")

    def __init__(self, image_shape: Sequence[int], k: int = 5, **base: Any):
        if k < 1:
            raise UserError(f"model.k={k} must be a positive number of importance samples, e.g. 5.")
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        k = self.hparams.k
        iwae = (torch.logsumexp(self.log_weights(x, k), 0) - math.log(k)).mean()
        return super().loss_terms(x, split) | {"loss": -iwae, "iwae": iwae}


class BetaTCVAE(VAE):
    """β-TCVAE (Chen et al., 2018): the KL term split into index-code mutual information, total correlation and
    dimension-wise KL (losses.kl_decomposition, estimated from each batch for the whole training set), with the
    total correlation weighted: `loss` = recon + mi + tc_weight * tc + dim_kl. `kl` and `elbo` stay the analytic
    ones, so val/elbo and the checkpoint choice are a VAE's."""

    def __init__(self, image_shape: Sequence[int], tc_weight: float = 6.0, **base: Any):
        check_positive("model.tc_weight", tc_weight, "6")
        super().__init__(image_shape, **base)
        self.dataset_size: int | None = None  # of the training set, once a Trainer sets the model up

    def setup(self, stage: str) -> None:
        train_set = getattr(self.trainer.datamodule, "train_set", None)
        self.dataset_size = len(train_set) if train_set is not None else None

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self.likelihood.nll(self.decoder(z), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        parts = kl_decomposition(z, mu, logvar, self.dataset_size or len(x))
        loss = recon + parts["mi"] + self.hparams.tc_weight * parts["tc"] + parts["dim_kl"]
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), **parts}
