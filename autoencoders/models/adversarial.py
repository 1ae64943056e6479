"""Autoencoders trained against a discriminator on their codes: the adversarial autoencoder and FactorVAE."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.errors import UserError
from autoencoders.models.ae import AE
from autoencoders.models.vae import VAE
from autoencoders.optim import configure_optimizers


def code_discriminator(dim: int, hidden: int) -> nn.Sequential:
    """An MLP from codes to one logit."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
    )


class AdversarialTraining(AE):
    """Two optimizers through Lightning's manual optimization: each training step updates the autoencoder on its
    `loss` (conf/optimizer, conf/scheduler), then the discriminator (an MLP of `discriminator_width` units on the
    codes) on `discriminator` (Adam at `discriminator_lr`, betas (0.5, 0.9) as in FactorVAE), both terms of
    `loss_terms`. The discriminator's step is not counted in
    `global_step`, which stays the autoencoder's steps. Schedules step as Lightning would step them (per step or per
    epoch, ReduceLROnPlateau on its monitored metric)."""

    automatic_optimization = False

    def __init__(
        self, image_shape: Sequence[int], discriminator_lr: float = 1e-4, discriminator_width: int = 256, **base: Any
    ):
        super().__init__(image_shape, **base)
        self.discriminator = code_discriminator(self.latent_dim, discriminator_width)

    def parameter_groups(self) -> list[Tensor]:
        own = {id(p) for p in self.discriminator.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches if self.scheduler else 0
        main = configure_optimizers(self.optimizer, self.scheduler, self.parameter_groups(), steps, self.selection)
        adam = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.discriminator_lr, betas=(0.5, 0.9))
        return main if isinstance(main, dict) else {"optimizer": main}, {"optimizer": adam}

    def on_fit_start(self) -> None:
        if self.trainer.precision == "16-mixed":
            raise UserError(
                f"{type(self).__name__} trains with two optimizers, which this project runs without fp16's loss "
                "scaling. Use trainer.precision=bf16-mixed (GPUs from Ampere on) or 32-true."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        terms = self.loss_terms(x, "train")
        self.track("train", terms, len(x))
        autoencoder, discriminator = self.optimizers()
        autoencoder.zero_grad()
        self.manual_backward(terms["loss"])
        autoencoder.step()
        discriminator.zero_grad()  # also drops what the autoencoder's loss put on its weights
        self.manual_backward(terms["discriminator"])
        discriminator.optimizer.step()  # the bare optimizer: Lightning would count a second step
        self._step_schedules("step", self.global_step)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._step_schedules("epoch", self.current_epoch + 1)

    def _step_schedules(self, interval: str, count: int) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and count % config.frequency == 0:
                if config.reduce_on_plateau:
                    config.scheduler.step(self.trainer.callback_metrics[config.monitor])
                else:
                    config.scheduler.step()


class AAE(AdversarialTraining):
    """Adversarial autoencoder (Makhzani et al., 2015): a deterministic encoder whose codes a discriminator tells
    apart from N(0, I) draws. `loss` = recon + adversarial_weight * `adversarial` (-log D(z), the encoder fooling the
    discriminator); `discriminator` = -log D(prior draw) - log(1 - D(z)), batch means. Samples decode N(0, I) draws."""

    def __init__(self, image_shape: Sequence[int], adversarial_weight: float = 1.0, **base: Any):
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        z = self.encode(x)
        recon = self.likelihood.nll(self.decoder(z), x).mean()
        fake = self.discriminator(z)
        adversarial = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        discriminator = real_vs_fake(self.discriminator(torch.randn_like(z)), self.discriminator(z.detach()))
        loss = recon + self.hparams.adversarial_weight * adversarial
        return {"loss": loss, "recon": recon, "adversarial": adversarial, "discriminator": discriminator}


def real_vs_fake(real: Tensor, fake: Tensor) -> Tensor:
    """A discriminator's loss from its logits: -log D(real) - log(1 - D(fake)), batch means."""
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )


def permute_dims(z: Tensor) -> Tensor:
    """Each code dim shuffled across the batch on its own: draws from the product of z's marginals."""
    order = torch.argsort(torch.rand(z.shape, device=z.device), dim=0)
    return torch.gather(z, 0, order)


class FactorVAE(AdversarialTraining, VAE):
    """FactorVAE (Kim & Mnih, 2018): a VAE whose codes' total correlation is penalised, as estimated by a
    discriminator D between codes z ~ q(z|x) and codes with each dim shuffled across the batch (`permute_dims`,
    standing for draws from the product of q(z)'s marginals). `loss` = recon + beta * KL + tc_weight * `tc`, tc =
    the batch mean of D's logit, log D(z) / (1 - D(z)); `discriminator` = -log D(z) - log(1 - D(permuted z)), on
    detached codes of the same batch (the paper draws a second batch). `kl` and `elbo` are a VAE's, so val/elbo and
    the checkpoint choice are too."""

    def __init__(self, image_shape: Sequence[int], tc_weight: float = 6.0, **base: Any):
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        draw = self.gaussian_draw(x)
        recon, kl, z = draw.recon.mean(), draw.kl.mean(), draw.z
        tc = self.discriminator(z).mean()
        discriminator = real_vs_fake(self.discriminator(z.detach()), self.discriminator(permute_dims(z.detach())))
        loss = recon + self.kl_beta() * kl + self.hparams.tc_weight * tc
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "tc": tc, "discriminator": discriminator}
