"""Autoencoders trained against a discriminator: on their codes, the adversarial autoencoder and FactorVAE; on their
images, VAE-GAN."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.errors import UserError
from autoencoders.losses import gaussian_log_prob, kl_divergence
from autoencoders.models.ae import AE
from autoencoders.models.vae import VAE
from autoencoders.nets import NETS
from autoencoders.optim import configure_optimizers


def code_discriminator(dim: int, hidden: int) -> nn.Sequential:
    """An MLP from codes to one logit."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
    )


class AdversarialTraining(AE):
    """Two optimizers through Lightning's manual optimization: each training step updates the autoencoder on its
    `loss` (conf/optimizer, conf/scheduler), then the discriminator (`build_discriminator`) on `discriminator` (Adam
    at `discriminator_lr`, betas (0.5, 0.9) as in FactorVAE), both terms of `loss_terms`. What the autoencoder's
    backward pass leaves on the discriminator's weights is dropped before the discriminator's own. The
    discriminator's step is not counted in `global_step`, which stays the autoencoder's steps. Schedules step as
    Lightning would step them (per step or per epoch, ReduceLROnPlateau on its monitored metric)."""

    automatic_optimization = False

    def __init__(self, image_shape: Sequence[int], discriminator_lr: float = 1e-4, **base: Any):
        super().__init__(image_shape, **base)
        self.discriminator = self.build_discriminator()

    def build_discriminator(self) -> nn.Module:
        """An MLP on the codes with `discriminator_width` hidden units (AAE's and FactorVAE's)."""
        return code_discriminator(self.latent_dim, self.hparams.discriminator_width)

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

    def __init__(
        self, image_shape: Sequence[int], adversarial_weight: float = 1.0, discriminator_width: int = 256, **base: Any
    ):
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        z = self.encode(x)
        recon = self.likelihood.nll(self.decoder(z), x).mean()
        fake = self.discriminator(z)
        adversarial = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        discriminator = real_vs_fake(self.discriminator(torch.randn_like(z)), self.discriminator(z.detach()))
        loss = recon + self.hparams.adversarial_weight * adversarial
        return {"loss": loss, "recon": recon, "adversarial": adversarial, "discriminator": discriminator}


def real_vs_fake(real: Tensor, *fakes: Tensor) -> Tensor:
    """A discriminator's loss from its logits: -log D(real) - sum over `fakes` of log(1 - D(fake)), batch means."""
    loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    return loss + sum(F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)) for fake in fakes)


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

    def __init__(self, image_shape: Sequence[int], tc_weight: float = 6.0, discriminator_width: int = 256, **base: Any):
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        draw = self.gaussian_draw(x)
        recon, kl, z = draw.recon.mean(), draw.kl.mean(), draw.z
        tc = self.discriminator(z).mean()
        discriminator = real_vs_fake(self.discriminator(z.detach()), self.discriminator(permute_dims(z.detach())))
        loss = recon + self.kl_beta() * kl + self.hparams.tc_weight * tc
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "tc": tc, "discriminator": discriminator}


class ImageDiscriminator(nn.Module):
    """An encoder of nets.py (`arch`, `widths`) with one output, the logit that an image is real. Its `features` are
    the outputs of the layers before its last linear map (or conv), a feature map for conv and resnet, normalised
    per image to mean 0 and variance 1 (a layer norm without weights) before that layer sees them. A unit-variance
    Gaussian on them (VAE-GAN's L_llike) needs features at unit scale, as the paper's batch norm gave its own: at the
    small scale of these nets' raw outputs, reconstructions differ by a few nats, less than a code costs in KL, and
    the posterior collapses (0.002 nats of KL after 5 epochs on the bundled digits)."""

    def __init__(self, arch: str, image_shape: Sequence[int], widths: Sequence[int] | None = None):
        super().__init__()
        net = NETS[arch][0](image_shape, 1, **({} if widths is None else {"widths": tuple(widths)}))
        layers = list(net)
        last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear | nn.Conv2d))
        self.features, self.head = nn.Sequential(*layers[:last]), nn.Sequential(*layers[last:])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each image's features, flattened, (B, F), and its logit, (B, 1)."""
        features = self.features(x)
        features = F.layer_norm(features, features.shape[1:])
        return features.flatten(1), self.head(features)


def scale_gradient(t: Tensor, scale: float) -> Tensor:
    """t, whose gradient is multiplied by `scale` on its way back."""
    return t.detach() + scale * (t - t.detach())


class VAEGAN(AdversarialTraining, VAE):
    """VAE-GAN (Larsen et al., 2016, "Autoencoding beyond pixels using a learned similarity metric"): a VAE whose
    decoder is also a GAN's generator, and whose reconstructions are scored in the features of the GAN's
    discriminator Dis (`ImageDiscriminator` of the model's `arch` and `widths`; Dis_l its last hidden layer). With
    x~ = Dec(z), z ~ q(z|x), and x_p = Dec(z_p), z_p ~ N(0, I), the images the likelihood's means, batch means:
    - `kl` = L_prior = KL(q(z|x) || N(0, I)), nats;
    - `llike` = L_llike = -log N(Dis_l(x); Dis_l(x~), I), summed over the features (nats of that density);
    - `discriminator` = -L_GAN = -log Dis(x) - log(1 - Dis(x~)) - log(1 - Dis(x_p)), nats.
    The encoder minimises kl + llike, the decoder gamma * llike + L_GAN (it fools Dis: the paper's gamma * L_llike -
    L_GAN, whose L_GAN is Dis's loss), Dis -L_GAN. Autoencoder and discriminator have their own optimizers
    (`AdversarialTraining`); the encoder's and the decoder's objectives reach their weights through one backward
    pass of `loss` = kl + gamma * llike + log(1 - Dis(x~)) + log(1 - Dis(x_p)), its gradient routed, as in the
    authors' code: the codes reach llike with their gradient scaled by 1 / gamma and the GAN terms detached, so the
    encoder gets that of kl + llike and the decoder that of gamma * llike + L_GAN; Dis trains on detached images.

    `recon`, `elbo` and `test/nll` are a VAE's, of the pixel likelihood `likelihood` of the decoder's output, on
    which the decoder is not trained: its nll is a bound for a decoder trained otherwise. The checkpoint is chosen on
    `val/elbo` (max), as a VAE's: `llike` is measured in features that change as Dis trains, so it compares no two
    checkpoints."""

    def __init__(self, image_shape: Sequence[int], gamma: float = 1.0, **base: Any):
        super().__init__(image_shape, **base)

    def build_discriminator(self) -> ImageDiscriminator:
        return ImageDiscriminator(self.hparams.arch, self.image_shape, self.hparams.widths)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        n, gamma = len(x), self.hparams.gamma
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        out = self.decoder(torch.cat([scale_gradient(z, 1 / gamma), z.detach(), torch.randn_like(z)]))
        images = self.likelihood.mean(out)  # x~ for llike, then x~ and x_p for L_GAN
        features, logits = self.discriminator(torch.cat([x, images[n:].detach()]))
        fake_features, fake_logits = self.discriminator(images)  # one pass: features of x~, logits of the rest
        real_features = features[:n].detach()
        llike = -gaussian_log_prob(real_features, fake_features[:n], torch.zeros_like(real_features)).mean()
        fooling = -F.softplus(fake_logits[n:]).sum() / n  # log(1 - Dis(x~)) + log(1 - Dis(x_p)), batch means
        recon, kl = self.likelihood.nll(out[:n], x).mean(), kl_divergence(mu, logvar).mean()
        terms = {"loss": kl + gamma * llike + fooling, "recon": recon, "kl": kl, "elbo": -(recon + kl)}
        return terms | {"llike": llike, "discriminator": real_vs_fake(*logits.split(n))}
