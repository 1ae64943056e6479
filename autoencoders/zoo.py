"""The rest of the model zoo: each an objective over the nets of an AE or a VAE (any `arch`), in nats per image.

Each takes its own settings and passes every AE/VAE argument (image_shape, latent_dim, arch, widths, likelihood,
optimizer, ...) through to its base class. β-VAE is `VAE` with `kl_weight=β`.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from autoencoders.errors import UserError, check_non_negative, check_positive
from autoencoders.losses import imq_mmd, kl_decomposition, kl_divergence
from autoencoders.models import AE, VAE
from autoencoders.samplers import CodePrior, Sampler, nearest_codes

CORRUPTIONS = ("gaussian", "masking")


class DAE(AE):
    """Denoising autoencoder (Vincent et al., 2008): encodes a corrupted input and is trained on the NLL of the clean
    one, `loss` = -log p(x | decode(encode(corrupt(x)))). `corruption`: `gaussian` adds N(0, noise^2) to every pixel,
    `masking` sets each pixel to 0 with probability `noise`. `recon` (validation and test, and the selection metric)
    is the clean input's reconstruction NLL, as for every AE."""

    def __init__(self, image_shape: Sequence[int], corruption: str = "gaussian", noise: float = 0.3, **base: Any):
        if corruption not in CORRUPTIONS:
            raise UserError(f"model.corruption={corruption!r} is unknown. Use one of: {', '.join(CORRUPTIONS)}.")
        if not 0 <= noise <= (1 if corruption == "masking" else math.inf):
            raise UserError(
                f"model.noise={noise} is no {corruption} noise level: a standard deviation >= 0 for gaussian, a "
                "probability in [0, 1] for masking (e.g. model.noise=0.3)."
            )
        super().__init__(image_shape, **base)

    def corrupt(self, x: Tensor) -> Tensor:
        noise = self.hparams.noise
        if self.hparams.corruption == "masking":
            return x * (torch.rand_like(x) >= noise)
        return x + noise * torch.randn_like(x)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        terms = {"loss": self.likelihood.nll(self.decoder_params(self.corrupt(x)), x).mean()}
        return terms if split == "train" else terms | {"recon": self.reconstruction_nll(x).mean()}


class CodePenaltyAE(AE):
    """An AE whose loss adds a weighted penalty on its codes: `loss` = recon + weight * penalty(z), the penalty logged
    as `term` and its weight the hyperparameter `weight_key`."""

    term: str
    weight_key: str

    def penalty(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        z = self.encode(x)
        recon = self.likelihood.nll(self.decoder(z), x).mean()
        penalty = self.penalty(z)
        return {"loss": recon + self.hparams[self.weight_key] * penalty, "recon": recon, self.term: penalty}


class SparseAE(CodePenaltyAE):
    """An AE with an L1 penalty on its codes: `loss` = recon + sparsity * |z|_1 (Ng's sparse coding, the L1 form)."""

    term, weight_key = "l1", "sparsity"

    def __init__(self, image_shape: Sequence[int], sparsity: float = 1.0, **base: Any):
        check_non_negative("model.sparsity", sparsity, "1")
        super().__init__(image_shape, **base)

    def penalty(self, z: Tensor) -> Tensor:
        return z.abs().sum(1).mean()


class WAE(CodePenaltyAE):
    """Wasserstein autoencoder, WAE-MMD (Tolstikhin et al., 2018): a deterministic encoder whose codes are pulled to
    the prior N(0, I) by `loss` = recon + mmd_weight * MMD^2 (inverse multiquadric kernels, losses.imq_mmd), against
    as many prior draws as the batch has images."""

    term, weight_key = "mmd", "mmd_weight"

    def __init__(self, image_shape: Sequence[int], mmd_weight: float = 10.0, **base: Any):
        check_non_negative("model.mmd_weight", mmd_weight, "10")
        super().__init__(image_shape, **base)

    def penalty(self, z: Tensor) -> Tensor:
        return imq_mmd(z, torch.randn_like(z)) if len(z) > 1 else z.new_zeros(())


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

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self.likelihood.nll(self.decoder(z), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        datamodule = getattr(self._trainer, "datamodule", None)
        parts = kl_decomposition(z, mu, logvar, len(datamodule.train_set) if datamodule else len(x))
        loss = recon + parts["mi"] + self.hparams.tc_weight * parts["tc"] + parts["dim_kl"]
        return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), **parts}


class VQVAE(AE):
    """VQ-VAE (van den Oord et al., 2017). The encoder's code z_e (latent_dim numbers) is `latent_dim //
    embedding_dim` tokens, each replaced by its nearest of `codebook_size` codebook vectors; the decoder sees those,
    with straight-through gradients. `loss` = recon + commitment * |z_e - sg[e]|^2 (+ |sg[z_e] - e|^2, the codebook
    term, unless `ema`: then the codebook follows exponential moving averages of its tokens, `decay`). The squared
    distances are summed per image (not nats). Logs the codebook's `perplexity` (exp of the entropy of its use in a
    batch) and `usage` (the share of its vectors a batch uses).

    `encode` returns z_e and `decode` quantizes first. There is no N(0, I) prior: samples come from a CodePrior
    (samplers.py) fitted to the training codes, which evaluate.py fits and caches (`samplers=[prior]`) or
    `prior_sampler().fit(codes)` in Python; until then `sample()` says so instead of decoding noise."""

    def __init__(
        self,
        image_shape: Sequence[int],
        codebook_size: int = 64,
        embedding_dim: int = 4,
        commitment: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        **base: Any,
    ):
        latent_dim = base.get("latent_dim", 16)
        if embedding_dim < 1 or latent_dim % embedding_dim:
            raise UserError(
                f"model.embedding_dim={embedding_dim} does not divide latent_dim={latent_dim} into tokens. Use a "
                "divisor, e.g. latent_dim=16 model.embedding_dim=4 (4 tokens)."
            )
        if codebook_size < 2 or not 0 < decay < 1:
            raise UserError(
                f"model.codebook_size={codebook_size} and model.decay={decay}: use at least 2 codebook vectors and "
                "a decay between 0 and 1 (e.g. 64 and 0.99)."
            )
        super().__init__(image_shape, **base)
        self.n_tokens = latent_dim // embedding_dim
        self.codebook = torch.nn.Parameter(torch.randn(codebook_size, embedding_dim), requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.detach().clone())

    def tokens(self, z: Tensor) -> Tensor:
        """The codebook index of each of z's tokens, (B, n_tokens)."""
        return nearest_codes(z.view(len(z), self.n_tokens, -1), self.codebook)

    def quantize(self, z: Tensor) -> Tensor:
        """z with each token replaced by its nearest codebook vector (flat, as z)."""
        return self.codebook[self.tokens(z)].flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decoder(self.quantize(z)))

    def decoder_params(self, x: Tensor) -> Tensor:
        return self.decoder(self.quantize(self.encode(x)))

    def prior_sampler(self) -> CodePrior:
        return CodePrior(self.codebook, self.n_tokens)

    def sample(self, n: int, generator: torch.Generator | None = None, sampler: Sampler | None = None) -> Tensor:
        if sampler is None:
            raise UserError(
                "A VQ-VAE has no N(0, I) prior to sample from: its samples need a code prior fitted to its training "
                "codes. evaluate.py fits one (samplers=[prior]); in Python, pass sampler=model.prior_sampler()"
                ".fit(model.encode(train_images))."
            )
        return super().sample(n, generator, sampler)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        z = self.encode(x)
        index = self.tokens(z)
        chosen = self.codebook[index].flatten(1)
        recon = self.likelihood.nll(self.decoder(z + (chosen - z).detach()), x).mean()  # straight-through
        commitment = (z - chosen.detach()).pow(2).sum(1).mean()
        terms = {"recon": recon, "commitment": commitment}
        loss = recon + self.hparams.commitment * commitment
        if self.hparams.ema:
            if split == "train" and self.training:
                self._ema_update(z.detach().view(-1, self.codebook.shape[1]), index.flatten())
        else:
            terms["codebook"] = (z.detach() - chosen).pow(2).sum(1).mean()
            loss = loss + terms["codebook"]
        return {"loss": loss, **terms, **self.codebook_use(index)}

    def codebook_use(self, index: Tensor) -> dict[str, Tensor]:
        """Of the codebook indices `index`: `perplexity`, exp of the entropy of the codebook's use (at most its size),
        and `usage`, the share of its vectors used."""
        use = torch.bincount(index.flatten(), minlength=len(self.codebook)).float() / index.numel()
        entropy = -(use * use.clamp_min(1e-12).log()).sum()  # unused vectors add 0, with no data-dependent shape
        return {"perplexity": entropy.exp(), "usage": (use > 0).float().mean()}

    @torch.no_grad()
    def _ema_update(self, tokens: Tensor, index: Tensor) -> None:
        decay, size = self.hparams.decay, len(self.codebook)
        one_hot = torch.nn.functional.one_hot(index, size).type_as(tokens)
        self.ema_count.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(one_hot.T @ tokens, alpha=1 - decay)
        count = (self.ema_count + 1e-5) / (self.ema_count.sum() + size * 1e-5) * self.ema_count.sum()  # Laplace
        self.codebook.data.copy_(self.ema_sum / count[:, None])
