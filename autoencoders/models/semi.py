"""Semi-supervised VAEs (Kingma et al., 2014): M2, and M1+M2 (M2 over the frozen codes of a pretrained VAE)."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.checkpoints import MODELS, read_checkpoint
from autoencoders.data import ImageDataModule
from autoencoders.data.augment import Augmentation
from autoencoders.errors import UserError
from autoencoders.likelihoods import Gaussian
from autoencoders.losses import gaussian_log_prob, kl_divergence
from autoencoders.models.classifier import check_encoder_kind, check_held_out
from autoencoders.models.vae import VAE
from autoencoders.nets import build_nets
from autoencoders.samplers import Sampler

FEATURES = 256  # what M2's image net passes on to q(z|x,y), which reads it beside y's one-hot vector


class CodeGaussian(Gaussian):
    """A diagonal Gaussian on real numbers (the mean unbounded): M1+M2's p(z1|y,z2) over M1's codes."""

    name = "code_gaussian"

    def _location(self, loc: Tensor) -> Tensor:
        return loc


class ClassSampler(Sampler):
    """M2's prior over its codes [z, one-hot y]: z ~ N(0, I), y uniform over the classes, or `label` for all."""

    def __init__(self, latent_dim: int, num_classes: int, label: int | None = None):
        super().__init__(latent_dim + num_classes)
        self.latent_dim, self.num_classes, self.label = latent_dim, num_classes, label

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator else None
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        if self.label is None:
            y = torch.randint(self.num_classes, (n,), generator=generator, device=device)
        else:
            y = torch.full((n,), self.label, device=device)
        return torch.cat([z, F.one_hot(y, self.num_classes).float()], 1)


class M2(VAE):
    """Kingma et al.'s (2014) M2: p(y) uniform, p(z) = N(0, I), p(x|y,z) from the decoder on [z, one-hot y];
    inference nets q(y|x) (a classifier of the same arch) and q(z|x,y) (the encoder's features beside y).

    Training batches hold labelled and unlabelled images of the same training split (the data module serves them
    for a model with `semi_supervised`; label -1: unlabelled): the labelled bound L(x,y) = -log p(x|y,z) + KL(q(z|x,y)
    || p(z)) - log p(y), the unlabelled U(x) = sum_y q(y|x) L(x,y) - H(q(y|x)), and the labelled images'
    cross-entropy -log q(y|x). As in Kingma et al.'s code (learn_yz_x_ss.py: the objective summed over the N_l
    labelled and N_u unlabelled images, the cross-entropy weighted by alpha N / N_l, and divided by N = N_l + N_u),
    per image the loss is (N_l / N) mean L + (N_u / N) mean U + `alpha` mean CE, so `alpha` is the paper's (0.1 there).
    `consistency` adds that weight (ramped up over `consistency_rampup` steps) times `consistency_term`.
    `val/elbo` and `test/elbo` are -U(x), a bound on log p(x) (KL weight 1); `acc` is q(y|x)'s accuracy, and the
    checkpoint is chosen on `val/acc`.

    With `encoder_ckpt` (a VAE run's checkpoint) it is M1+M2: the VAE (M1) is frozen, M2 (an MLP) models the codes
    M1 decodes, a draw z1 ~ q(z1|x) of the posterior M1 samples from in training (after an IAF's flow, a Ladder VAE's
    top-down pass) and M1's code (`encode`) otherwise, under a Gaussian p(z1|y,z2); its terms are named `code_*`:
    nats of M1's codes, not of images. Images decode through M1's decoder. Its checkpoints hold M1's weights.

    Its code, for the autoencoder interface (encode, decode, samplers, interpolations), is [z, one-hot y], y the
    classifier's guess: `sample(n, label=3)` draws threes.
    """

    selection = ("val/acc", "max")
    semi_supervised = True

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        latent_dim: int = 16,
        arch: str = "mlp",
        widths: Sequence[int] | None = None,
        likelihood: str = "bernoulli",
        alpha: float = 0.1,
        consistency: float = 0.0,
        consistency_rampup: int = 0,
        encoder_ckpt: str | Path | None = None,
        m1: dict | None = None,
        **base: Any,
    ):
        pretrained = read_checkpoint(encoder_ckpt) if encoder_ckpt is not None else None
        if pretrained is not None:
            m1 = m1_settings(pretrained, encoder_ckpt, image_shape)
        self.num_classes = num_classes
        super().__init__(image_shape, latent_dim, arch if m1 is None else "mlp", widths, likelihood, **base)
        # A checkpoint rebuilds M1 from `m1`, with its weights in this model's state_dict: encoder_ckpt is no
        # hyperparameter, so loading one never needs the VAE's file.
        self.hparams.update(m1=m1, arch=arch if m1 is None else "mlp")
        self.hparams.pop("encoder_ckpt", None)
        self.m1_model = None if m1 is None else build_m1(m1)
        if self.m1_model is not None:
            self.code_likelihood, self.likelihood = CodeGaussian(), self.m1_model.likelihood
            if pretrained is not None:
                self.m1_model.load_state_dict(pretrained["state_dict"])
            self.m1_model.requires_grad_(False).eval()
        else:
            self.code_likelihood = self.likelihood
        self.pretraining_data = pretrained.get(ImageDataModule.__qualname__) if pretrained is not None else None
        self.encoder_ckpt = encoder_ckpt
        self.shares = (0.5, 0.5)  # of the labelled and the unlabelled images among both, once the data are known
        self.augment: Augmentation | None = None  # the run's augment=, for the consistency term, with the data

    def build_nets(self, widths: Sequence[int] | None, decoder_shape: Sequence[int]) -> tuple[nn.Module, nn.Module]:
        """q(z|x,y)'s image net (FEATURES outputs), the decoder of [z, one-hot y], and q(y|x) and q(z|x,y)'s head."""
        arch, shape, classes = self.hparams.arch, self.net_input_shape, self.num_classes
        if self.hparams.get("m1") is not None:  # an MLP over M1's codes, with a Gaussian's two parameters per number
            arch, decoder_shape = "mlp", (2 * shape[0], 1, 1)
        encoder, decoder = build_nets(arch, shape, FEATURES, self.latent_dim + classes, widths, decoder_shape)
        self.classifier = build_nets(arch, shape, classes, 1, widths)[0]
        self.posterior_head = nn.Sequential(
            nn.ReLU(), nn.Linear(FEATURES + classes, FEATURES), nn.ReLU(), nn.Linear(FEATURES, 2 * self.latent_dim)
        )
        return encoder, decoder

    @property
    def net_input_shape(self) -> tuple[int, ...]:
        """What M2's nets read: the images, or for M1+M2 M1's codes as (latent_dim, 1, 1)."""
        m1 = self.hparams.get("m1")
        return self.image_shape if m1 is None else (m1["hparams"]["latent_dim"], 1, 1)

    @property
    def code_dim(self) -> int:
        return self.latent_dim + self.num_classes

    @property
    def bounds_images(self) -> bool:
        return self.m1_model is None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            labelled, unlabelled = len(datamodule.train_set), len(datamodule.unlabelled_set)
            self.shares = (labelled / (labelled + unlabelled), unlabelled / (labelled + unlabelled))
            self.augment = datamodule.augment  # the consistency term's transforms (train.py requires them for it)
        if stage == "fit" and self.m1_model is not None:
            check_held_out(self.pretraining_data, datamodule, self.encoder_ckpt)

    def parameter_groups(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]  # not a frozen M1's

    def train(self, mode: bool = True) -> "M2":
        super().train(mode)
        if self.m1_model is not None:
            self.m1_model.eval()  # frozen: M1's codes are its posterior's, never a training-mode variant
        return self

    # M2's inputs, and its distributions -----------------------------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        """What M2 models: the images, or M1's codes of them (a posterior draw in training, else M1's code)."""
        if self.m1_model is None:
            return x
        with torch.no_grad():
            z1 = self.m1_model.latent_draws(x, 1)[0][0] if self.training else self.m1_model.encode(x)
        return z1[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of images, log q(y|x) up to a constant, as a classifier's."""
        return self.classifier(self.inputs(x))

    def z_posterior(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x,y) from the image net's features h (B, FEATURES) and one-hot y (B, C)."""
        mu, logvar = self.posterior_head(torch.cat([h, y], 1)).chunk(2, dim=1)
        return mu, logvar

    def class_bound(self, x: Tensor, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """-log p(x|y,z) (one draw z ~ q(z|x,y)) and KL(q(z|x,y) || p(z)), nats per row, for inputs x, their
        features h and one-hot y."""
        mu, logvar = self.z_posterior(h, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.code_likelihood.nll(self.decoder(torch.cat([z, y], 1)), x), kl_divergence(mu, logvar)

    def unlabelled_terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """sum_y q(y|x) (-log p(x|y,z)) and KL(q(y,z|x) || p(y)p(z)) = sum_y q(y|x) KL_z(y) + KL(q(y|x) || p(y)),
        nats per input: their sum is U(x), so -(recon + kl) is the unlabelled bound."""
        b, c = len(x), self.num_classes
        h = self.encoder(x)
        every_class = torch.eye(c, device=x.device).repeat(b, 1)  # row i*c + k: input i with class k
        recon, kl_z = self.class_bound(x.repeat_interleave(c, 0), h.repeat_interleave(c, 0), every_class)
        q = logits.softmax(1)
        kl_y = (q * (logits.log_softmax(1) + math.log(c))).sum(1)
        return (q * recon.view(b, c)).sum(1), (q * kl_z.view(b, c)).sum(1) + kl_y

    # Training ---------------------------------------------------------------------------------------------------
    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        images, y = batch
        x = self.inputs(images)
        logits = self.classifier(x)
        labelled = y >= 0
        terms: dict[str, Tensor] = {}
        if split == "train":  # labelled bound on the labelled images, unlabelled bound on the others
            xl, yl = x[labelled], y[labelled]
            recon_l, kl_l = self.class_bound(xl, self.encoder(xl), F.one_hot(yl, self.num_classes).float())
            recon_u, kl_u = self.unlabelled_terms(x[~labelled], logits[~labelled])
            ce = F.cross_entropy(logits[labelled], yl)
            log_prior = math.log(self.num_classes)  # -log p(y) of the labelled bound
            beta = self.kl_beta()
            bound_l, bound_u = (recon_l + beta * kl_l).mean() + log_prior, (recon_u + beta * kl_u).mean()
            loss = self.shares[0] * bound_l + self.shares[1] * bound_u + self.hparams.alpha * ce
            terms = {"loss": loss, "labelled": bound_l, "unlabelled": bound_u}
            if self.hparams.consistency:
                terms["consistency"] = self.consistency_term(images[~labelled], logits[~labelled])
                terms["loss"] = loss + self.consistency_weight() * terms["consistency"]
            terms |= {"ce": ce, "acc": (logits[labelled].argmax(1) == yl).float().mean()}
        else:  # held-out images: the unlabelled bound of each, and the classifier's guess of its label
            recon, kl = (t.mean() for t in self.unlabelled_terms(x, logits))
            terms = self._bound_names({"recon": recon, "kl": kl, "elbo": -(recon + kl)})
            terms |= {"ce": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}
            if split == "test" and self.bounds_images:
                terms |= self.test_terms(images)
        self.track(split, terms, len(images))
        return terms.get("loss")

    def consistency_term(self, images: Tensor, logits: Tensor) -> Tensor:
        """Mean KL(q(y|x) || q(y|T(x))) over unlabelled images x, nats, the first q held fixed (its gradient stopped),
        T a random transform of the run's augment group (the Π-model's and UDA's consistency); `logits`: q(y|x)'s.
        T is drawn from torch's global generator, which callbacks.BatchSeeds seeds for each batch: a resume is exact.
        The images are the batch as served: under augment=affine already one draw, binarised if the data are."""
        target = logits.detach().log_softmax(1)
        moved = self.classifier(self.inputs(self.augment(images))).log_softmax(1)
        return F.kl_div(moved, target, reduction="batchmean", log_target=True)

    def consistency_weight(self) -> float:
        """`consistency`, ramped up over the first `consistency_rampup` steps by Laine and Aila's (2017) sigmoid-shaped
        exp(-5 (1 - t)²), t the share of the ramp-up done."""
        rampup, weight = self.hparams.consistency_rampup, self.hparams.consistency
        done = min(1.0, self.global_step / rampup) if rampup else 1.0
        return weight * math.exp(-5 * (1 - done) ** 2)

    def _bound_names(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """M1+M2's bounds are on M1's codes, not on images: `code_recon`, `code_kl`, `code_elbo`."""
        return terms if self.m1_model is None else {f"code_{k}": v for k, v in terms.items()}

    # The VAE interface: bounds on log p(x), for M2 of images ------------------------------------------------------
    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The unlabelled bound's reconstruction and KL terms per image (nats): -(recon + kl) <= log p(x)."""
        x = self.inputs(x)
        return self.unlabelled_terms(x, self.classifier(x))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x,y) for y the classifier's guess."""
        return self._guessed_posterior(x)[:2]

    def _guessed_posterior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The mean and log-variance of q(z|x,y) for images x, y the classifier's guess, and that guess, one-hot."""
        x = self.inputs(x)
        guess = F.one_hot(self.classifier(x).argmax(1), self.num_classes).float()
        return *self.z_posterior(self.encoder(x), guess), guess

    def log_weights(self, x: Tensor, n: int) -> Tensor:
        """log p(x, y, z) - log q(y, z|x) for n draws y ~ q(y|x), z ~ q(z|x,y) of each image, nats, (n, B)."""
        x = self.inputs(x)
        logits = self.classifier(x).log_softmax(1)
        y = torch.distributions.Categorical(logits=logits).sample((n,))  # (n, B)
        rows = F.one_hot(y.flatten(), self.num_classes).float()
        h = self.encoder(x).repeat(n, 1)
        mu, logvar = self.z_posterior(h, rows)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        log_px = -self.code_likelihood.nll(self.decoder(torch.cat([z, rows], 1)), x.repeat(n, 1, 1, 1))
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = gaussian_log_prob(z, mu, logvar)
        log_qy = logits.gather(1, y.T).T  # (n, B)
        return (log_px + log_pz - log_qz).view(n, -1) - math.log(self.num_classes) - log_qy

    # The autoencoder interface: codes [z, one-hot y] -----------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        mu, _, guess = self._guessed_posterior(x)
        return torch.cat([mu, guess], 1)

    def decode(self, code: Tensor) -> Tensor:
        return self.likelihood.mean(self._image_params(code))

    def decoder_params(self, x: Tensor) -> Tensor:
        return self._image_params(self.encode(x))

    def _image_params(self, code: Tensor) -> Tensor:
        params = self.decoder(code)
        if self.m1_model is None:
            return params
        return self.m1_model.decoder(self.code_likelihood.mean(params).flatten(1))

    def prior_sampler(self, label: int | None = None) -> ClassSampler:
        return ClassSampler(self.latent_dim, self.num_classes, label)

    def sample(
        self, n: int, generator: torch.Generator | None = None, sampler: Sampler | None = None, label: int | None = None
    ) -> Tensor:
        """n images from the prior (or `sampler`), all of class `label` if given."""
        return super().sample(n, generator, sampler or self.prior_sampler(label))


def m1_settings(ckpt: dict, path: str | Path, image_shape: Sequence[int]) -> dict:
    """What rebuilds M1 from a VAE checkpoint (read_checkpoint): its class name and hyperparameters."""
    check_encoder_kind(ckpt, path, m1m2=True)
    kind, hp = ckpt["autoencoders_class"], dict(ckpt["hyper_parameters"])
    if tuple(hp["image_shape"]) != tuple(image_shape):
        raise UserError(
            f"encoder_ckpt={str(path)!r} was trained on images of shape {tuple(hp['image_shape'])}, but the data's "
            f"are {tuple(image_shape)}. Use the data the VAE was trained on."
        )
    return {"class": kind, "hparams": {k: v for k, v in hp.items() if k not in ("optimizer", "scheduler")}}


def build_m1(m1: dict) -> VAE:
    """M1 from `m1_settings`. Built here, not inside M2.__init__: Lightning's save_hyperparameters takes the arguments
    of every __init__ up the call stack, so the VAE would get M2's arch, latent_dim and widths."""
    return MODELS[m1["class"]](**m1["hparams"])
