"""LightningModules: each is an objective over pluggable nets (see nets.py)."""

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor

from autoencoders.data import split_position
from autoencoders.errors import UserError
from autoencoders.likelihoods import bits_per_dim
from autoencoders.likelihoods import likelihood as get_likelihood
from autoencoders.losses import gaussian_log_prob, kl_divergence
from autoencoders.nets import build_nets
from autoencoders.optim import OptimizerFactory, configure_optimizers, default_optimizer
from autoencoders.samplers import Sampler

MODELS: dict[str, type["SplitSteps"]] = {}  # the registry: every model class by name, as its checkpoints record it
HELD_OUT_SEEDS = {"val": 1, "test": 2}  # with a batch's position in its split, the seed of its random draws


class SplitSteps(L.LightningModule):
    """Training, validation and test steps that are one `_step(batch, split)`, differing only in the split's name,
    and the optimizer and schedule of conf/optimizer and conf/scheduler (optim.py) over `parameter_groups()`.

    `selection` is the validation metric, and whether higher is better, that picks a run's best checkpoint. Every
    subclass registers itself in MODELS, and its checkpoints record its name and module, which is all that
    `autoencoders.load` needs to rebuild it.
    """

    selection: tuple[str, str] = ("val/loss", "min")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODELS[cls.__name__] = cls

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoders_class"] = type(self).__name__
        checkpoint["autoencoders_module"] = type(self).__module__

    def __init__(self, optimizer: OptimizerFactory | None = None, scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.optimizer, self.scheduler = optimizer or default_optimizer, scheduler

    def parameter_groups(self) -> Iterable:
        return self.parameters()

    def setup(self, stage: str) -> None:
        if self.trainer.strategy.root_device.type == "cpu":  # NHWC conv weights: 6-20% faster conv epochs on a 2-core
            self.to(memory_format=torch.channels_last)  # CPU (benchmarks/levers.py); on GPUs not measured, so not used

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches if self.scheduler else 0
        return configure_optimizers(self.optimizer, self.scheduler, self.parameter_groups(), steps, self.selection)

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self._held_out("val", batch_idx):
            self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self._held_out("test", batch_idx):
            self._step(batch, "test")

    @contextmanager
    def _held_out(self, split: str, batch_idx: int) -> Iterator[None]:
        """Validation and test run in fp32 whatever the training precision, and their random draws (a VAE's z) are
        seeded by the batch's position in its split: the same in every epoch, run and number of processes, so
        checkpoints are compared on common noise and a DDP run's scores equal a single process's."""
        seed = hash((HELD_OUT_SEEDS[split], split_position(batch_idx, self.global_rank, self.trainer.world_size)))
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=False), torch.random.fork_rng([self.device] if cuda else []):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it takes 0.35 ms, seeding every backend
            if cuda:
                torch.cuda.manual_seed(seed)  # this process's GPU
            yield


class EpochMeanLogging(L.LightningModule):
    """Logs exact epoch means of batch-mean terms (e.g. nats per image) at a fixed, small cost per step.

    Each `self.log` call costs about a millisecond on a CPU (Lightning walks its result state every time), so a few
    per step add 10-30% to a small model's step. `track` adds a step's terms, times its batch size, to one vector of
    sums per split on the device (no `.item()`, so no sync). At the epoch's end the sums and image counts are added
    up across processes, so each mean is over every image of the split, not a mean of per-process means:
    `train/<k>_epoch`, `val/<k>`, `test/<k>`. Training terms also go straight to the loggers every
    `trainer.log_every_n_steps` steps as `train/<k>_step` (one sync each time; kept in `logged_step_metrics`).
    """

    def __init__(self, **optimization: Any) -> None:
        super().__init__(**optimization)
        self._sums: dict[str, tuple[list[str], Tensor]] = {}  # split -> (term names, their weighted sums)
        self._counts: dict[str, int] = {}
        self.logged_step_metrics: dict[str, float] = {}  # the latest train/<k>_step values (progress bar)

    def track(self, split: str, terms: dict[str, Tensor], batch_size: int) -> None:
        values = torch.stack([v.detach() for v in terms.values()])
        names, sums = self._sums.get(split, (list(terms), 0))
        # float64 sums (float32 on Apple's MPS, which has no float64): exact whatever the order of adding them up
        self._sums[split] = names, sums + values.to(torch.float32 if values.is_mps else torch.float64) * batch_size
        self._counts[split] = self._counts.get(split, 0) + batch_size
        every = self.trainer.log_every_n_steps  # 0: never, as in Lightning
        if split == "train" and every and self.global_step % every == 0:
            self.logged_step_metrics = dict(zip((f"train/{k}_step" for k in terms), values.tolist(), strict=True))
            for logger in self.loggers:
                logger.log_metrics(self.logged_step_metrics, step=self.global_step)

    def _log_means(self, split: str, suffix: str = "") -> None:
        if split not in self._sums:
            return
        names, sums = self._sums.pop(split)
        count = torch.tensor([self._counts.pop(split)], dtype=sums.dtype, device=sums.device)
        totals = self.trainer.strategy.reduce(torch.cat([sums, count]), reduce_op="sum")  # over processes
        means = totals[:-1] / totals[-1]
        # Already the same on every process: `max` over them keeps the values exact (Lightning's default, the mean,
        # would add and divide them).
        self.log_dict({f"{split}/{k}{suffix}": v for k, v in zip(names, means, strict=True)}, sync_dist=True,
                      reduce_fx="max")  # fmt: skip

    def on_train_epoch_end(self) -> None:
        self._log_means("train", "_epoch")

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_means("test")


def minimised(terms: dict[str, Tensor]) -> Tensor:
    """Of a model's `loss_terms`, the one it minimises: `loss`, or `recon` for a plain AE, whose loss it is."""
    return terms["loss"] if "loss" in terms else terms["recon"]


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
        if latent_dim <= 0:
            raise UserError(f"latent_dim={latent_dim} is not a positive integer. Set e.g. latent_dim=16.")
        self.likelihood = get_likelihood(likelihood)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        c, *size = image_shape
        self.encoder, self.decoder = build_nets(
            arch,
            image_shape,
            latent_dim * self.code_multiplier,
            latent_dim,
            widths,
            decoder_shape=(c * self.likelihood.param_multiplier, *size),
        )

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

    def prior_sampler(self) -> Sampler:
        """The model's own prior over codes: N(0, I) (a VQ-VAE's must be fitted to its codes first: `needs_fit`)."""
        return Sampler(self.latent_dim)

    def sample(self, n: int, generator: torch.Generator | None = None, sampler: Sampler | None = None) -> Tensor:
        """Decode n codes drawn from `sampler`, a fitted sampler of samplers.py (e.g. a Gaussian mixture of the
        training codes); None: `prior_sampler()`, z ~ N(0, I): a VAE's prior, and for a plain AE the lecture's
        'random embedding'."""
        return self.decode((sampler or self.prior_sampler()).draw(n, generator).to(self.device))

    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 10) -> Tensor:
        """Decode a*z1 + (1-a)*z2 for a from 1 to 0; returns (B, steps, C, H, W), row b going from x1[b] to x2[b]."""
        z1, z2 = self.encode(x1), self.encode(x2)
        a = torch.linspace(1, 0, steps, device=z1.device).view(1, steps, 1)
        z = a * z1.unsqueeze(1) + (1 - a) * z2.unsqueeze(1)
        return self.decode(z.flatten(0, 1)).unflatten(0, (len(x1), steps))

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


class VAE(AE):
    """Gaussian-latent VAE. Encoder outputs (mu, log-variance); loss = recon + beta*KL, beta warmed up linearly.

    The best checkpoint is the one with the highest `val/elbo` (KL weight 1, whatever the training weight). The test
    split also gets `test/nll`, the importance-weighted bound with `nll_samples` samples, and `test/bpd`.
    """

    code_multiplier = 2
    selection = ("val/elbo", "max")

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
        if not warmup or self._trainer is None:
            return self.hparams.kl_weight
        # optimizer steps per epoch: under gradient accumulation, fewer than batches
        batches = self.trainer.num_training_batches  # inf before the training loop has counted them
        steps = batches / self.trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(steps) if math.isfinite(steps) else steps
        progress = self.trainer.global_step / max(1, warmup * steps_per_epoch)
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
