"""Gaussian-latent VAEs: VAE (β-VAE with kl_weight=β), the IWAE family (IWAE, MIWAE, CIWAE, PIWAE), β-TCVAE,
capacity-controlled β-VAE, MS-SSIM VAE, InfoVAE."""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from autoencoders.errors import UserError
from autoencoders.likelihoods import bits_per_dim
from autoencoders.losses import gaussian_log_prob, imq_mmd, kl_decomposition, kl_divergence
from autoencoders.models.ae import AE
from autoencoders.optim import OptimizerFactory


class GaussianDraw(NamedTuple):
    """One code per image drawn from the Gaussian posterior, with its parameters, the decoder's output at that code
    and, per image in nats, the reconstruction NLL there and the analytic KL(q(z|x) || N(0, I))."""

    z: Tensor
    mu: Tensor
    logvar: Tensor
    decoded: Tensor
    recon: Tensor
    kl: Tensor


class VAE(AE):
    """Gaussian-latent VAE. Encoder outputs (mu, log-variance); loss = recon + beta*KL, beta = `kl_weight` on the
    schedule `kl_schedule` (`kl_beta`).

    The best checkpoint is the one with the highest `val/elbo` (KL weight 1, whatever the training weight). The test
    split also gets `test/nll`, the importance-weighted bound with `nll_samples` samples, and `test/bpd`.

    Subclasses with another prior (`prior_log_prob`) or posterior (`latent_draws`) whose KL has no closed form set
    `analytic_kl = False`: their `kl` is then the one-sample estimate log q(z|x) - log p(z) at the z decoded.
    """

    code_multiplier = 2
    selection = ("val/elbo", "max")
    bounds_images = True  # elbo and log_likelihood bound log p(x) of images (M1+M2's: of another model's codes)
    analytic_kl = True  # KL(q(z|x) || N(0, I)) in closed form

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
        kl_schedule: str = "linear",
        kl_cycles: int = 4,
    ):
        if kl_schedule == "constant" and kl_warmup_epochs:
            raise UserError(
                f"model.kl_schedule=constant with model.kl_warmup_epochs={kl_warmup_epochs}: `constant` has no "
                "warm-up. Use model.kl_warmup_epochs=0, or model.kl_schedule=linear to ramp the weight up."
            )
        super().__init__(image_shape, latent_dim, arch, widths, likelihood, optimizer, scheduler)
        self.steps_per_epoch: float | None = None  # optimizer steps per epoch, once training starts (warm-up)
        self.total_steps: float | None = None  # optimizer steps of the whole run, once training starts (cycles)

    def on_train_start(self) -> None:
        # under gradient accumulation fewer than batches; inf for a training set without a length
        steps = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        self.steps_per_epoch = math.ceil(steps) if math.isfinite(steps) else steps
        self.total_steps = total = self.trainer.estimated_stepping_batches
        if self.hparams.kl_schedule != "cyclic":
            return
        if not math.isfinite(total):
            raise UserError(
                "model.kl_schedule=cyclic spreads its model.kl_cycles cycles over the run's steps, but this run has no "
                "end (trainer.max_epochs=-1 without trainer.max_steps). Set trainer.max_epochs or +trainer.max_steps."
            )
        cycles = self.hparams.kl_cycles
        if 2 * cycles > total:  # a cycle of one step is all ramp: its weight stays 0
            raise UserError(
                f"model.kl_cycles={cycles} cycles in this run's {total} optimizer steps leave each cycle "
                f"{total / cycles:.2g} steps, too few to ramp the KL weight up from 0 (that takes 2 or more). Use "
                f"model.kl_cycles={total // 2} or fewer, or train for at least {2 * cycles} steps."
            )

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]

    def kl_per_dim(self, x: Tensor) -> Tensor | None:
        """KL(q(z_u|x) || N(0, 1)) of each image and code dimension u, (B, d), of the encoder's Gaussian (for a flow
        or a hierarchy, before the flow or the top-down pass); None where the posterior is no Gaussian."""
        mu, logvar = self.posterior(x)
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) of codes (..., D), nats, summed over the code: N(0, I)."""
        return gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))

    def latent_draws(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """n draws z ~ q(z|x) of each image's code, (n, B, D), by the reparameterization trick, and log q(z|x) -
        log p(z) of each, (n, B), nats."""
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, device=mu.device)
        return z, gaussian_log_prob(z, mu, logvar) - self.prior_log_prob(z)

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One-sample reconstruction NLL and KL per image (nats): the KL analytic where `analytic_kl`."""
        if not self.analytic_kl:
            z, kl = self.latent_draws(x, 1)
            return self.likelihood.nll(self.decoder(z[0]), x), kl[0]
        draw = self.gaussian_draw(x)
        return draw.recon, draw.kl

    def gaussian_draw(self, x: Tensor) -> GaussianDraw:
        """z ~ q(z|x) by the reparameterization trick, and what the ELBO's terms need of it."""
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        decoded = self.decoder(z)
        return GaussianDraw(z, mu, logvar, decoded, self.likelihood.nll(decoded, x), kl_divergence(mu, logvar))

    def elbo(self, x: Tensor) -> Tensor:
        """Evidence lower bound per image in nats (always with KL weight 1)."""
        recon, kl = self.elbo_terms(x)
        return -(recon + kl)

    def log_weights(self, x: Tensor, n: int) -> Tensor:
        """log p(x, z_i) - log q(z_i|x) for n draws z_i ~ q(z|x) of each image, nats, shape (n, B)."""
        z, log_q_over_p = self.latent_draws(x, n)
        log_px_z = -self.likelihood.nll(self.decoder(z.flatten(0, 1)), x.repeat(n, 1, 1, 1)).view(n, -1)
        return log_px_z - log_q_over_p

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, k: int = 1000, chunk: int = 100) -> Tensor:
        """Importance-weighted bound log p(x) >= log mean_k p(x, z_k)/q(z_k|x), nats per image, shape (B,).

        Samples are drawn `chunk` at a time so memory stays bounded for large k.
        """
        log_w = torch.cat([self.log_weights(x, min(chunk, k - start)) for start in range(0, k, chunk)])
        return torch.logsumexp(log_w, 0) - math.log(k)

    def kl_beta(self) -> float:
        """The KL weight at this training step: `kl_weight` times the schedule's factor in [0, 1]. `linear`: ramped
        up from 0 over kl_warmup_epochs (0: none), then 1. `constant`: 1. `cyclic` (Fu et al., 2019): the run's steps
        in `kl_cycles` equal cycles, each ramping from 0 over its first half, then 1 for the second."""
        schedule, weight = self.hparams.kl_schedule, self.hparams.kl_weight
        if self.steps_per_epoch is None:  # not in training (evaluate.py): the full weight
            return weight
        if schedule == "cyclic":
            cycle = self.total_steps / self.hparams.kl_cycles
            return weight * min(1.0, (self.global_step % cycle) / (0.5 * cycle))
        warmup = self.hparams.kl_warmup_epochs * self.steps_per_epoch
        return weight * min(1.0, self.global_step / warmup) if warmup else weight

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
    mean_k w_k, w = p(x, z)/q(z|x); and Rainforth et al.'s (2018) variants, with m x k draws per image: MIWAE, the
    mean of m such k-sample bounds (`m`), and CIWAE, beta * ELBO + (1 - beta) * the bound, the ELBO the mean of the
    log w (`beta`); m = 1 and beta = 0 is the IWAE. Its checkpoint is chosen on the bound it trains (`val/iwae`); its
    one-sample `elbo` and `test/nll` are a VAE's."""

    selection = ("val/iwae", "max")

    def __init__(self, image_shape: Sequence[int], k: int = 5, m: int = 1, beta: float = 0.0, **base: Any):
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        bound = self.bound_terms(x)  # drawn before the VAE's one-sample terms
        return super().loss_terms(x, split) | bound

    def bound_terms(self, x: Tensor) -> dict[str, Tensor]:
        """The `loss` this model trains and the bound it is chosen on (`iwae`), of m x k draws per image, nats."""
        k, m, beta = self.hparams.k, self.hparams.m, self.hparams.beta
        log_w = self.log_weights(x, m * k).view(m, k, -1)
        iwae = (torch.logsumexp(log_w, 1) - math.log(k)).mean(0)
        bound = (beta * log_w.mean((0, 1)) + (1 - beta) * iwae).mean()
        return {"loss": -bound, "iwae": bound}


class PIWAE(IWAE):
    """PIWAE (Rainforth et al., 2018, "Tighter variational bounds are not necessarily better"): from the same m x k
    draws per image, the decoder is trained on the m k-sample IWAE bound and the encoder on the MIWAE bound (the mean
    of m k-sample bounds): the more samples a bound takes, the higher the signal-to-noise ratio of its gradient for
    the decoder and the lower for the encoder, so each net gets the bound that suits it. `iwae`, which chooses the
    checkpoint, is the m k-sample bound (the decoder's, the tighter); `miwae` the encoder's; `loss` equals -iwae.

    The routing is one loss, -iwae(decoder's weights; draws held fixed) - miwae(draws; decoder's weights held fixed,
    by a functional call on detached copies), so that Lightning's single backward, and with it DDP's gradient
    all-reduce, loss scaling, accumulation and clipping, work as for any model; it costs one more decoder pass per
    training step (each net's backward goes through the decoder once)."""

    def __init__(self, image_shape: Sequence[int], k: int = 8, m: int = 8, **base: Any):
        super().__init__(image_shape, k=k, m=m, **base)

    def bound_terms(self, x: Tensor) -> dict[str, Tensor]:
        k, m = self.hparams.k, self.hparams.m
        z, log_q_over_p = self.latent_draws(x, m * k)
        targets = x.repeat(m * k, 1, 1, 1)

        def log_w(decoded: Tensor, log_q_over_p: Tensor) -> Tensor:
            return -self.likelihood.nll(decoded, targets).view(m * k, -1) - log_q_over_p

        # a graph that reaches the decoder's weights alone: the draws and their densities held fixed
        for_decoder = log_w(self.decoder(z.detach().flatten(0, 1)), log_q_over_p.detach())
        iwae = (torch.logsumexp(for_decoder, 0) - math.log(m * k)).mean()
        for_encoder = for_decoder  # the same values; when training, a graph that reaches the encoder alone
        if torch.is_grad_enabled():
            frozen = {name: p.detach() for name, p in self.decoder.named_parameters()}
            for_encoder = log_w(functional_call(self.decoder, frozen, (z.flatten(0, 1),)), log_q_over_p)
        miwae = (torch.logsumexp(for_encoder.view(m, k, -1), 1) - math.log(k)).mean()
        return {"loss": miwae.detach() - miwae - iwae, "iwae": iwae, "miwae": miwae}


class BetaTCVAE(VAE):
    """β-TCVAE (Chen et al., 2018): the KL term split into index-code mutual information, total correlation and
    dimension-wise KL (losses.kl_decomposition, estimated from each batch for the whole training set), with the
    total correlation weighted: `loss` = recon + beta * (mi + tc_weight * tc + dim_kl), beta the VAE's scheduled KL
    weight (1 by default). `kl` and `elbo` stay the analytic ones, so val/elbo and the checkpoint choice are a
    VAE's."""

    def __init__(self, image_shape: Sequence[int], tc_weight: float = 6.0, **base: Any):
        super().__init__(image_shape, **base)
        self.dataset_size: int | None = None  # of the training set, once a Trainer sets the model up

    def setup(self, stage: str) -> None:
        super().setup(stage)
        train_set = getattr(self.trainer.datamodule, "train_set", None)
        self.dataset_size = len(train_set) if train_set is not None else None

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        draw = self.gaussian_draw(x)
        recon, kl = draw.recon.mean(), draw.kl.mean()
        parts = kl_decomposition(draw.z, draw.mu, draw.logvar, self.dataset_size or len(x))
        loss = recon + self.kl_beta() * (parts["mi"] + self.hparams.tc_weight * parts["tc"] + parts["dim_kl"])
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), **parts}


class CapacityVAE(VAE):
    """β-VAE with a controlled capacity (Burgess et al., 2018, "Understanding disentangling in β-VAE"): `loss` =
    recon + gamma * |KL - C|, the target KL C raised linearly from 0 nats at the first training step to `capacity`
    nats at step `capacity_steps`, then held, so the code takes on information a few nats at a time. C follows the
    global step, so a resumed run goes on where it stopped. `kl` and `elbo` are a VAE's, so val/elbo and the
    checkpoint choice are too; gamma and C take the place of the VAE's KL weight and its schedule."""

    def __init__(
        self,
        image_shape: Sequence[int],
        gamma: float = 1000.0,
        capacity: float = 25.0,
        capacity_steps: int = 100_000,
        **base: Any,
    ):
        super().__init__(image_shape, **base)

    def capacity_now(self) -> float:
        """C at this training step, nats."""
        step = self.trainer.global_step if self._trainer is not None else 0
        return self.hparams.capacity * min(1.0, step / self.hparams.capacity_steps)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        recon, kl = (term.mean() for term in self.elbo_terms(x))
        capacity = torch.tensor(self.capacity_now(), device=x.device)
        loss = recon + self.hparams.gamma * (kl - capacity).abs()
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "capacity": capacity}


WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # MS-SSIM's exponent of each scale, finest first (Wang et al.)


class MSSSIMVAE(VAE):
    """A VAE trained on a perceptual similarity (Snell et al., 2017; pythae's MSSSIM_VAE): `loss` = recon_weight *
    (1 - MS-SSIM(x, the decoded mean)) + beta * KL, beta the VAE's scheduled KL weight. MS-SSIM (logged as `msssim`,
    a similarity in [0, 1], no unit) is torchmetrics' per image over `scales` scales, each half the size of the one
    before, with a Gaussian window of std `sigma` (2 int(3.5 sigma + 0.5) + 1 pixels a side: 7 for 0.75), data range
    1, each scale's value mapped to [0, 1] by (v + 1) / 2 as pythae does (so a negative one cannot give NaN), and Wang
    et al.'s exponents of the first `scales` scales rescaled to sum to 1. Images too small for the scales and window
    are refused when the model is built.

    The loss is no likelihood, and not in nats. `recon`, `elbo` and `test/nll` stay a VAE's, with the data's pixel
    likelihood (`likelihood`), so they compare with the other VAEs'; but this decoder is not trained on that
    likelihood: only its mean is trained, through MS-SSIM, and any scale it outputs stays as initialised, so these
    nats are poor. The checkpoint is chosen on `val/loss`, the objective it trains at the full KL weight
    (`kl_weight`, whatever the schedule's factor that epoch). pythae's weight is 1: against a KL
    of tens of nats, a term of at most 1 leaves the code empty, hence 1000."""

    selection = ("val/loss", "min")

    def __init__(
        self,
        image_shape: Sequence[int],
        recon_weight: float = 1000.0,
        scales: int = 3,
        sigma: float = 0.75,
        **base: Any,
    ):
        super().__init__(image_shape, **base)
        self.betas = tuple(beta / sum(WANG_BETAS[:scales]) for beta in WANG_BETAS[:scales])
        self.window = 2 * int(3.5 * sigma + 0.5) + 1  # torchmetrics' Gaussian window; its kernel_size is not used
        blank = torch.zeros(1, *self.image_shape)
        try:  # torchmetrics' checks of the size (ValueError), and a reflection pad wider than a scale (RuntimeError)
            self.msssim(blank, blank)
        except (ValueError, RuntimeError) as error:
            _, height, width = self.image_shape
            raise UserError(
                f"model=msssim_vae: MS-SSIM over model.scales={scales} scales with a {self.window}-pixel window "
                f"(model.sigma={sigma}) does not fit {height}x{width} images: {str(error).rstrip('.')}. Use fewer "
                "scales or a smaller sigma: model.scales=2 model.sigma=0.75 fits images of 8x8 and up, 3 and 0.75 of "
                "28x28 and up."
            ) from None

    def msssim(self, x: Tensor, target: Tensor) -> Tensor:
        """MS-SSIM of each image of x to its target, shape (B,), in [0, 1]; in float32 whatever the precision."""
        with torch.autocast(x.device.type, enabled=False):
            return multiscale_structural_similarity_index_measure(
                x.float(), target.float(), sigma=self.hparams.sigma, kernel_size=self.window, reduction="none",
                data_range=1.0, betas=self.betas, normalize="simple",
            )  # fmt: skip

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        draw = self.gaussian_draw(x)
        recon, kl = draw.recon.mean(), draw.kl.mean()
        msssim = self.msssim(self.likelihood.mean(draw.decoded), x).mean()
        beta = self.kl_beta() if split == "train" else self.hparams.kl_weight  # val/loss: one weight for every epoch
        loss = self.hparams.recon_weight * (1 - msssim) + beta * kl
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "msssim": msssim}


class InfoVAE(VAE):
    """InfoVAE with the MMD divergence (Zhao et al., 2019; MMD-VAE): `loss` = recon + (1 - alpha) * beta * KL +
    (alpha + mmd_weight - 1) * MMD^2(q(z), N(0, I)), the MMD between the batch's codes z ~ q(z|x) and as many prior
    draws (losses.imq_mmd), beta the scheduled KL weight. alpha = 1 drops the KL (the MMD-VAE); alpha = 0 and
    mmd_weight = 1 is the VAE. `kl` and `elbo` are a VAE's, so val/elbo and the checkpoint choice are too."""

    def __init__(self, image_shape: Sequence[int], alpha: float = 0.0, mmd_weight: float = 10.0, **base: Any):
        if alpha + mmd_weight < 1:
            raise UserError(
                f"model.alpha={alpha} and model.mmd_weight={mmd_weight} give the MMD a negative weight, alpha + "
                "mmd_weight - 1. Use alpha + mmd_weight >= 1 (e.g. model.alpha=0 and model.mmd_weight=10)."
            )
        super().__init__(image_shape, **base)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        draw = self.gaussian_draw(x)
        recon, kl, z = draw.recon.mean(), draw.kl.mean(), draw.z
        mmd = imq_mmd(z, torch.randn_like(z)) if len(z) > 1 else z.new_zeros(())
        alpha, weight = self.hparams.alpha, self.hparams.mmd_weight
        loss = recon + (1 - alpha) * self.kl_beta() * kl + (alpha + weight - 1) * mmd
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "mmd": mmd}
