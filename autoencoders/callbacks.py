"""Training callbacks: a progress bar that costs little per step, and TensorBoard images of what an autoencoder does
to real inputs, to prior samples and between two inputs."""

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from autoencoders.models import AE
from autoencoders.pictures import add_grid, image_grid


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, updated and redrawn at most `refresh_rate` times a second, showing the training
    loss and the model's validation selection metric (e.g. val/elbo) from the last epoch end.

    `refresh_rate` is also how often the bar's drawing thread wakes to see whether to redraw. At Lightning's default of
    100, each wake-up takes a core from torch's threads: on a 2-core CPU that alone slows a small model's steps by
    10-20%. The stock bar also updates its metrics after every training batch; this one skips the batches that end
    within 1/refresh_rate seconds of the last one shown (an epoch's last batch always shows), so reading the loss
    (a device sync) happens at most `refresh_rate` times a second.
    """

    def __init__(self, refresh_rate: int = 2):
        super().__init__(refresh_rate=refresh_rate)
        self._shown_at = 0.0
        self._loss: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        now = time.monotonic()
        if now - self._shown_at >= 1 / self.refresh_rate or batch_idx + 1 == self.total_train_batches:
            self._shown_at = now
            self._loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else None
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if self._loss is not None:
            metrics["loss"] = f"{self._loss:.4g}"
        selection = getattr(pl_module, "selection", (None,))[0]
        if selection in trainer.callback_metrics:
            metrics[selection] = f"{trainer.callback_metrics[selection].item():.4g}"
        return metrics


class ImageLogger(L.Callback):
    """Every `every_n_epochs` validation epochs and after the last, log grids of a fixed batch of validation images
    and of fixed prior draws.

    Tags: images/reconstructions (originals above reconstructions), images/samples (decoded z ~ N(0, I)),
    images/interpolations (one row per pair, a*z1 + (1-a)*z2), and latent/scatter for 2-D codes. At the end of
    fit, codes of the validation images go to the embedding projector (latent_dim > 2).
    """

    def __init__(
        self,
        num_images: int = 16,
        num_samples: int = 64,
        num_pairs: int = 8,
        steps: int = 10,
        num_codes: int = 1000,
        every_n_epochs: int = 5,
    ):
        self.num_images, self.num_samples, self.num_pairs, self.steps = num_images, num_samples, num_pairs, steps
        self.num_codes, self.every_n_epochs = num_codes, every_n_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images, labels = trainer.datamodule.val_set.tensors
        generator = torch.Generator().manual_seed(0)
        chosen = torch.randperm(len(images), generator=generator)[: self.num_codes]  # the split may be sorted by label
        self.images, self.labels = images[chosen], labels[chosen]
        self.prior_z = torch.randn(self.num_samples, pl_module.latent_dim, generator=generator)

    def _tensorboard(self, trainer: L.Trainer):
        if trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            return trainer.logger.experiment
        return None

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = self._tensorboard(trainer)
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if tb is None or trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs and not last):
            return
        model: AE = pl_module
        step, device = trainer.global_step, model.device
        x = self.images[: self.num_images].to(device)
        add_grid(tb, "images/reconstructions", image_grid(torch.cat([x, model.reconstruct(x)]), nrow=len(x)), step)
        add_grid(tb, "images/samples", image_grid(model.decode(self.prior_z.to(device)), nrow=8), step)
        pairs = self.images[: 2 * self.num_pairs].to(device)
        rows = model.interpolate(pairs[0::2], pairs[1::2], self.steps)
        add_grid(tb, "images/interpolations", image_grid(rows.flatten(0, 1), nrow=self.steps), step)
        if model.latent_dim == 2:
            tb.add_figure("latent/scatter", self._scatter(model.encode(self.images.to(device)).cpu()), step)

    def _scatter(self, codes: torch.Tensor):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        points = ax.scatter(codes[:, 0], codes[:, 1], c=self.labels, cmap="tab10", s=4)
        ax.legend(*points.legend_elements(), title="label", fontsize="small", loc="best")
        ax.set(xlabel="z[0]", ylabel="z[1]", title="validation codes")
        return fig

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = self._tensorboard(trainer)
        if tb is None or pl_module.latent_dim == 2:
            return
        codes = pl_module.encode(self.images.to(pl_module.device)).cpu()
        tb.add_embedding(
            codes, metadata=self.labels.tolist(), label_img=self.images, global_step=trainer.global_step, tag="latent"
        )
