"""Deterministic autoencoders: AE, DAE, and AEs with a penalty on their codes (sparse, WAE, RAE)."""

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.errors import UserError
from autoencoders.likelihoods import likelihood as get_likelihood
from autoencoders.losses import imq_mmd
from autoencoders.models.base import EpochMeanLogging, SplitSteps, minimised
from autoencoders.nets import build_nets
from autoencoders.optim import OptimizerFactory
from autoencoders.samplers import GMMSampler, Sampler


class AE(EpochMeanLogging, SplitSteps):
    """Deterministic autoencoder trained on the reconstruction NLL -log p(x | decode(encode(x))), nats per image,
    logged as `<split>/recon` (its loss, so it has no separate `loss`).

    The decoder outputs the parameters of `likelihood` (likelihoods.py); `decode` returns that distribution's mean.
    `optimizer` and `scheduler` are conf/optimizer's and conf/scheduler's (null: Adam at 1e-3, no schedule).
    """

    code_multiplier = 1  # encoder outputs per latent dim
    selection = ("val/recon", "min")

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 16,
        arch: str = "mlp",
        widths: Sequence[int] | None = None,
        likelihood: str = "bernoulli",
        optimizer: OptimizerFactory | None = None,
        scheduler: dict[str, Any] | None = None,
    ):
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        self.likelihood = get_likelihood(likelihood)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.example_input_array = torch.zeros(1, *image_shape)  # the model summary's FLOPs per image
        c, *size = image_shape
        self.encoder, self.decoder = self.build_nets(widths, (c * self.likelihood.param_multiplier, *size))

    def build_nets(self, widths: Sequence[int] | None, decoder_shape: Sequence[int]) -> tuple[nn.Module, nn.Module]:
        """The encoder (latent_dim * code_multiplier outputs) and the decoder (`decoder_shape` likelihood parameters)
        of `hparams.arch`."""
        code = self.latent_dim * self.code_multiplier
        return build_nets(self.hparams.arch, self.image_shape, code, self.latent_dim, widths, decoder_shape)

    # Public interface ---------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """The mean image of p(x|z), in [0, 1]."""
        return self.likelihood.mean(self.decoder(z))

    def decoder_params(self, x: Tensor) -> Tensor:
        """The parameters of p(x | code of x) that the decoder outputs: the one decoding that training, evaluation and
        pictures all go through (a VQ-VAE quantises the code first)."""
        return self.decoder(self.encode(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.likelihood.mean(self.decoder_params(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def prior_sampler(self) -> Sampler:
        """The model's own prior over codes: N(0, I) (a VQ-VAE's must be fitted to its codes first: `needs_fit`)."""
        return Sampler(self.latent_dim)

    def sample(self, n: int, generator: torch.Generator | None = None, sampler: Sampler | None = None) -> Tensor:
        """Decode n codes drawn from `sampler`, a fitted sampler of samplers.py (e.g. a Gaussian mixture of the
        training codes); None: `prior_sampler()`, z ~ N(0, I): a VAE's prior, and for a plain AE the lecture's
        'random embedding'."""
        if sampler is None:
            sampler = self.prior_sampler()
            if sampler.needs_fit:
                raise UserError(
                    f"A {type(self).__name__} has no N(0, I) prior to sample from: its samples need a code prior "
                    "fitted to its training codes. evaluate.py fits one (samplers=[prior]); in Python, pass "
                    "sampler=model.prior_sampler().fit(model.encode(train_images))."
                )
        return self.decode(sampler.draw(n, generator).to(self.device))

    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 10) -> Tensor:
        """Decode a*z1 + (1-a)*z2 for a from 1 to 0; returns (B, steps, C, H, W), row b going from x1[b] to x2[b]."""
        z1, z2 = self.encode(x1), self.encode(x2)
        a = torch.linspace(1, 0, steps, device=z1.device).view(1, steps, 1)
        z = a * z1.unsqueeze(1) + (1 - a) * z2.unsqueeze(1)
        return self.decode(z.flatten(0, 1)).unflatten(0, (len(x1), steps))

    @property
    def code_dim(self) -> int:
        """The size of `encode(x)`, the codes that samplers fit and draw."""
        return self.latent_dim

    def reconstruction_nll(self, x: Tensor) -> Tensor:
        """-log p(x | decode(encode(x))) per image, nats, shape (B,)."""
        return self.likelihood.nll(self.decoder_params(x), x)

    # Training -----------------------------------------------------------------------------------------------
    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        """Batch means, in nats per image; `minimised(terms)` is the training objective."""
        return {"recon": self.reconstruction_nll(x).mean()}

    def test_terms(self, x: Tensor) -> dict[str, Tensor]:
        """What the test split reports beyond `loss_terms`, batch means (a VAE's likelihood bound)."""
        return {}

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        terms = self.loss_terms(batch[0], split)
        self.track(split, terms | (self.test_terms(batch[0]) if split == "test" else {}), len(batch[0]))
        return minimised(terms)


class DAE(AE):
    """Denoising autoencoder (Vincent et al., 2008): encodes a corrupted input and is trained on the NLL of the clean
    one, `loss` = -log p(x | decode(encode(corrupt(x)))). `corruption`: `gaussian` adds N(0, noise^2) to every pixel,
    `masking` sets each pixel to 0 with probability `noise`. `recon` (validation and test, and the selection metric)
    is the clean input's reconstruction NLL, as for every AE."""

    def __init__(self, image_shape: Sequence[int], corruption: str = "gaussian", noise: float = 0.3, **base: Any):
        if corruption == "masking" and noise > 1:
            raise UserError(
                f"model.noise={noise} is no masking probability: with model.corruption=masking it is the share of "
                "pixels zeroed, in [0, 1] (e.g. model.noise=0.3)."
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
    """An AE with sparse codes: `loss` = recon + sparsity * |z|_1 / |z|_2, per image (from 1, one nonzero unit, to
    sqrt(latent_dim), all equal; Hoyer, 2004). A plain L1 penalty |z|_1 can be dodged: the encoder shrinks every
    code by a factor c and the decoder's first layer grows by 1/c, which leaves the reconstruction as it was and the
    penalty c times smaller, with codes no sparser. The ratio is the same at any scale, so only sparser codes lower
    it."""

    term, weight_key = "l1_over_l2", "sparsity"

    def __init__(self, image_shape: Sequence[int], sparsity: float = 3.0, **base: Any):
        super().__init__(image_shape, **base)

    def penalty(self, z: Tensor) -> Tensor:
        return (z.norm(p=1, dim=1) / z.norm(dim=1).clamp_min(1e-8)).mean()


class WAE(CodePenaltyAE):
    """Wasserstein autoencoder, WAE-MMD (Tolstikhin et al., 2018): a deterministic encoder whose codes are pulled to
    the prior N(0, I) by `loss` = recon + mmd_weight * MMD^2 (inverse multiquadric kernels, losses.imq_mmd), against
    as many prior draws as the batch has images."""

    term, weight_key = "mmd", "mmd_weight"

    def __init__(self, image_shape: Sequence[int], mmd_weight: float = 10.0, **base: Any):
        super().__init__(image_shape, **base)

    def penalty(self, z: Tensor) -> Tensor:
        return imq_mmd(z, torch.randn_like(z)) if len(z) > 1 else z.new_zeros(())


class RAE(CodePenaltyAE):
    """Regularised autoencoder (Ghosh et al., 2020): a deterministic AE with `loss` = recon + embedding_weight *
    |z|^2 / 2 + decoder_weight * a penalty on the decoder, by `decoder_penalty`:
    - `l2` (RAE-L2): |decoder weights|^2 (biases excluded), logged as `decoder_l2`;
    - `gradient` (RAE-GP): the mean over images and code dimensions of (d/dz sum of the decoded image's squared
      pixels)^2 at z = encode(x), as the authors' code computes its gradient penalty (`grad_pen_loss`), logged as
      `decoder_gradient`: the decoder is pushed to be smooth around the codes.
    Its samples come from a Gaussian mixture fitted to the training codes after training (ex-post density
    estimation; evaluate.py's `prior` sampler fits it, `gmm_components` 10 by default)."""

    term, weight_key = "code_l2", "embedding_weight"

    def __init__(
        self,
        image_shape: Sequence[int],
        embedding_weight: float = 1e-4,
        decoder_weight: float = 1e-7,
        decoder_penalty: str = "l2",
        **base: Any,
    ):
        super().__init__(image_shape, **base)

    def penalty(self, z: Tensor) -> Tensor:
        return 0.5 * z.pow(2).sum(1).mean()

    def prior_sampler(self) -> GMMSampler:
        return GMMSampler(self.latent_dim)

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        if self.hparams.decoder_penalty == "l2":
            terms = super().loss_terms(x, split)
            weights = (p for name, p in self.decoder.named_parameters() if name.endswith("weight"))
            penalty, name = sum(p.pow(2).sum() for p in weights), "decoder_l2"
        else:
            z = self.encode(x)
            training = z.requires_grad  # not on held-out batches, nor for a model loaded for inference
            # held-out batches run without autograd (in inference mode under Lightning): a copy of their codes is the
            # leaf that the decoder's gradient is taken at
            with contextlib.nullcontext() if training else torch.inference_mode(False), torch.enable_grad():
                z = z if training else z.clone().requires_grad_()
                params = self.decoder(z)
                squares = self.likelihood.mean(params).pow(2).sum()
                (slope,) = torch.autograd.grad(squares, z, create_graph=training)
            recon = self.likelihood.nll(params, x).mean()
            code_l2 = self.penalty(z)
            terms = {"loss": recon + self.hparams.embedding_weight * code_l2, "recon": recon, self.term: code_l2}
            penalty, name = slope.pow(2).mean(), "decoder_gradient"
        return terms | {"loss": terms["loss"] + self.hparams.decoder_weight * penalty, name: penalty}
