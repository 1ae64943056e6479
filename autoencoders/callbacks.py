"""The Lightning callbacks of conf/callbacks: the best checkpoint by validation and last.ckpt on a time budget, a
progress bar that costs little per
step, images of what an autoencoder does to real inputs, to prior samples and between two inputs, a NaN/Inf guard,
a clear exit on preemption, and seeds that make resumes exact."""

import copy
import functools
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchvision.utils import save_image

from autoencoders.checkpoints import all_finite
from autoencoders.cli import to_log_file
from autoencoders.errors import EveryProcessError, UserError
from autoencoders.files import atomic, remove, written
from autoencoders.internals import accumulating, checkpoint_of, scalar_logging_step, stop_at_next_step
from autoencoders.loggers import log_image
from autoencoders.models import AE
from autoencoders.pictures import image_grid, kl_chart, kl_per_dim, latent_traversal, manifold, scatter_chart
from autoencoders.probes import knn_vote
from autoencoders.seeds import seed_torch, stream_seed


class HeldCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that saves where Lightning's does (an epoch's end, a validation), into memory: each save is a
    copy of the checkpoint (on the model's device; no disk), held until `write_held` writes it."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._held: tuple[str, dict] | None = None  # (file, checkpoint) not yet written

    def on_train_batch_end(self, *args: Any) -> None:
        """Nothing: ModelCheckpoint checks every step whether a step-based save is due, which none is here."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:  # ModelCheckpoint's save
        self._last_global_step_saved = trainer.global_step
        if not trainer.is_global_zero:
            return
        checkpoint = checkpoint_of(trainer, self.save_weights_only)
        if self.due():  # written now, while its tensors are this step's: no copy
            self._held = filepath, checkpoint
            self.write_held(trainer)
        else:  # held: a copy, since the tensors change with the next step
            self._held = filepath, copy.deepcopy(checkpoint)

    def due(self) -> bool:
        """Whether a save is written at once instead of held."""
        return False

    def write_held(self, trainer: L.Trainer) -> bool:
        """Write the held checkpoint, if any; whether there was one."""
        if self._held is None:
            return False
        (path, checkpoint), self._held = self._held, None
        trainer.strategy.save_checkpoint(checkpoint, path)
        return True


class BestCheckpoint(HeldCheckpoint):
    """The best checkpoint by a validation metric (null: the model's selection metric), weights only: it is for testing
    and evaluation, so it skips the optimizer state (2/3 of an Adam-trained model's bytes). `val_metrics` are the
    validation metrics of the epoch that saved it, so metrics.json reports val and test of one and the same
    checkpoint.

    A new best costs no write on the training path: its weights are held in memory, and written (as
    best-epochNNN.ckpt) just before the next last.ckpt, which names it, and at the end of fit or when training stops
    on an error or a signal. The best it replaces is removed after that last.ckpt is durable, so the best checkpoint
    that any last.ckpt names is on disk, after any crash."""

    def __init__(self, dirpath: str | Path, monitor: str, mode: str):
        super().__init__(
            dirpath=dirpath,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_weights_only=True,
        )
        self.val_metrics: dict[str, float] = {}
        self.selected_at: dict[str, int] = {}  # the epoch and step of the best
        self._replaced: list[str] = []  # earlier bests, to remove once a newer last.ckpt is durable

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run started again in its dir (after a failure before any last.ckpt) drops the failed start's bests."""
        if trainer.ckpt_path is None and trainer.is_global_zero and self.dirpath is not None:
            for name in sorted(written(Path(self.dirpath))):
                if name.startswith("best-") and name.endswith(".ckpt"):
                    remove(Path(self.dirpath, name))

    def state_dict(self) -> dict[str, Any]:  # in last.ckpt, so a resumed run reports its best's metrics too
        return {**super().state_dict(), "val_metrics": self.val_metrics, "selected_at": self.selected_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.val_metrics = state_dict.get("val_metrics", {})
        self.selected_at = state_dict.get("selected_at", {})

    # Lightning saves at the end of the training epoch when validation ran just before it, else at validation's end.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._noting_a_new_best(super().on_train_epoch_end, trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._noting_a_new_best(super().on_validation_end, trainer, pl_module)

    def _noting_a_new_best(self, save, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self.best_model_score
        save(trainer, pl_module)
        # A new best has a strictly better score; not always a new file name: a second best in the same epoch (when
        # validation runs more than once an epoch) replaces the first under its name.
        if self.best_model_score is not None and (before is None or bool(self.best_model_score != before)):
            self.val_metrics = latest_val_metrics(trainer)
            self.selected_at = {"epoch": trainer.current_epoch, "step": trainer.global_step}

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:  # ModelCheckpoint's removal of the last
        if trainer.is_global_zero:  # the process that writes
            self._replaced.append(filepath)

    def remove_replaced(self, trainer: L.Trainer) -> None:
        """Remove the earlier bests, behind the saves in flight (SafeCheckpointIO queues removals)."""
        for path in self._replaced:
            if path != self.best_model_path:
                trainer.strategy.remove_checkpoint(path)
        self._replaced = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_all(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write_all(trainer)

    def _write_all(self, trainer: L.Trainer) -> None:
        self.write_held(trainer)
        if _last_checkpoint_callback(trainer) is None:  # else its next write removes them, once it is durable
            self.remove_replaced(trainer)


class LastCheckpoint(HeldCheckpoint):
    """checkpoints/last.ckpt, the whole state where Lightning saves (an epoch's end, or a validation inside an epoch
    with trainer.val_check_interval), for exact resumes (ckpt_path=last).

    Each saved state is held in memory, and written when at least `every_s` seconds have passed since the last write
    (0: every save), at the end of fit, and when training stops on an error or a signal: so a stop writes the last
    saved state, never one between two saves. A run killed outright (SIGKILL, power cut) resumes from the last write
    and trains the steps since again, which ends exactly where the uninterrupted run ends: batch order, noise and
    binarisation are drawn from (seed, epoch) and (seed, epoch, batch), and a resumed epoch goes on from its next batch
    (Batches). Each write first writes the best checkpoint that the state names."""

    def __init__(self, dirpath: str | Path, every_s: float):
        super().__init__(dirpath=dirpath, filename="last", enable_version_counter=False)
        self.every_s = every_s
        self._written_at = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._written_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._written_at >= self.every_s

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not accumulating(trainer):  # a validation between the batches of one optimizer step: their gradients
            super()._save_checkpoint(trainer, filepath)  # are in no checkpoint, so the last state stays held

    def write_held(self, trainer: L.Trainer) -> bool:
        """Write the held state, if any, after the best checkpoint that it names; whether there was one."""
        if self._held is None:
            return False
        bests = [c for c in trainer.callbacks if isinstance(c, BestCheckpoint)]
        for best in bests:
            best.write_held(trainer)
        try:
            super().write_held(trainer)
        finally:
            self._written_at = time.monotonic()
        for best in bests:
            best.remove_replaced(trainer)
        return True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_held(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        write_last_state(trainer)


def _last_checkpoint_callback(trainer: L.Trainer) -> LastCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)


def write_last_state(trainer: L.Trainer) -> Path | None:
    """Write the last saved state held in memory, if any; the run's last.ckpt, if it has one."""
    callback = _last_checkpoint_callback(trainer)
    if callback is None:
        return None
    try:
        written = callback.write_held(trainer)  # in place once durable, which the end of the process waits for
    except UserError:  # a non-finite state, which SafeCheckpointIO refuses: the previous file stays
        written = False
    last = Path(callback.dirpath or "", "last.ckpt")
    return last if written or last.is_file() else None


def latest_val_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The latest validation epoch's metrics."""
    return {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, updated and redrawn at most `refresh_rate` times a second, showing the training
    loss last logged (every `trainer.log_every_n_steps` steps) and the model's validation selection metric (e.g.
    val/elbo) from the last validation.

    `refresh_rate` is also how often the bar's drawing thread wakes to see whether to redraw. At Lightning's default of
    100, each wake-up takes a core from torch's threads: on a 2-core CPU that alone slows a small model's steps by
    10-20%. The stock bar also updates after every training batch; this one skips the batches that end within
    1/refresh_rate seconds of the last one shown (an epoch's last batch always shows). It reads only values that
    are already on the host, so it never syncs a step with the GPU.
    """

    def __init__(self, refresh_rate: int = 2):
        super().__init__(refresh_rate=refresh_rate)
        self._shown_at = 0.0
        self._selection: dict[str, str] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        now = time.monotonic()
        if now - self._shown_at >= 1 / self.refresh_rate or batch_idx + 1 == self.total_train_batches:
            self._shown_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Counts epochs from 1, "Epoch 2/2" for the last of 2, where Lightning's bar reads "Epoch 1/1"."""
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is None or self.train_progress_bar_id is None:
            return
        text = f"Epoch {trainer.current_epoch + 1}" + (
            f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""
        )
        style = self.theme.description
        self.progress.update(self.train_progress_bar_id, description=f"[{style}]{text}" if style else text)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        selection = getattr(pl_module, "selection", (None,))[0]
        if selection in trainer.callback_metrics:
            self._selection = {selection: f"{trainer.callback_metrics[selection].item():.4g}"}
        super().on_validation_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # a logger's version id: the run dir says where the run is
        logged = getattr(pl_module, "logged_step_metrics", {})
        loss = logged.get("train/loss_step", logged.get("train/recon_step"))
        if loss is not None:
            metrics["loss"] = f"{loss:.4g}"
        return metrics | self._selection


NO_PRIOR = (
    "No samples while training: this model's prior over codes is fitted to its training codes after training "
    "(a VQ-VAE's code prior). `python evaluate.py run_dir=<this run>` fits it and draws samples_prior."
)


class ImageLogger(L.Callback):
    """Every `every_n_epochs` validation epochs and after the last, log grids of a fixed batch of validation images
    and of prior draws at a fixed seed, to every logger that takes images, at the step of that epoch's validation
    scalars.

    Tags: images/reconstructions (originals above reconstructions), images/samples (decoded prior draws),
    images/interpolations (one row per pair, a*z1 + (1-a)*z2), and latent/scatter for 2-D codes. At the end of
    fit, also latent/traversal (pictures.latent_traversal), latent/manifold (2-D codes) and latent/kl_per_dim
    (VAEs); each tag carries its pictures.DESCRIPTIONS. All of them, of the final weights, are written as PNGs into
    `dirpath` (the run's pictures/), and codes of the validation images go to TensorBoard's embedding projector
    (latent_dim > 2). Models other than autoencoders (the classifier) get no images.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        num_images: int = 16,
        num_samples: int = 64,
        num_pairs: int = 8,
        steps: int = 10,
        num_codes: int = 1000,
        every_n_epochs: int = 5,
    ):
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.num_images, self.num_samples, self.num_pairs, self.steps = num_images, num_samples, num_pairs, steps
        self.num_codes, self.every_n_epochs = num_codes, every_n_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, AE):
            return
        images, labels = trainer.datamodule.inputs("val"), trainer.datamodule.val_set.labels
        generator = torch.Generator().manual_seed(0)
        chosen = torch.randperm(len(images), generator=generator)[: self.num_codes]  # the split may be sorted by label
        self.images, self.labels = images[chosen], labels[chosen]
        self.has_prior = not pl_module.prior_sampler().needs_fit  # a VQ-VAE's is fitted after training
        self._latest: tuple[int, dict[str, Tensor]] = (-1, {})  # (global step, grids) last logged

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if (
            not isinstance(pl_module, AE)
            or not trainer.is_global_zero
            or trainer.sanity_checking
            or (trainer.current_epoch % self.every_n_epochs and not last)
        ):
            return
        step = scalar_logging_step(trainer)
        if not self.has_prior and trainer.current_epoch == 0:
            for logger in trainer.loggers:  # said once, where text can go, instead of decoding noise
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("visual/samples", NO_PRIOR, step)
        self._latest = trainer.global_step, self._grids(pl_module)
        for tag, grid in self._latest[1].items():
            log_image(trainer.loggers, tag, grid, step)

    def _grids(self, model: AE) -> dict[str, Tensor]:
        """The grids of `model` by TensorBoard tag."""
        x = self.images[: self.num_images].to(model.device)
        grids = {"visual/reconstructions": image_grid(torch.cat([x, model.reconstruct(x)]), nrow=len(x))}
        if self.has_prior:
            # drawn anew with the same seed each time: a learned prior (VampPrior, a hierarchy's) changes in training
            samples = model.sample(self.num_samples, torch.Generator().manual_seed(0))
            grids["visual/samples"] = image_grid(samples, nrow=8)
        pairs = self.images[: 2 * min(self.num_pairs, len(self.images) // 2)].to(model.device)  # a small val split
        if len(pairs):
            rows = model.interpolate(pairs[0::2], pairs[1::2], self.steps)
            grids["visual/interpolations"] = image_grid(rows.flatten(0, 1), nrow=self.steps)
        if model.latent_dim == 2:
            grids["visual/scatter"] = scatter_chart(model.encode(self.images.to(model.device)), self.labels)
        return grids

    def _final_grids(self, model: AE) -> dict[str, Tensor]:
        """What the end of training adds: the latent traversal, for 2-d codes the decoded manifold, for VAEs the KL
        per code dimension."""
        images = self.images.to(model.device)
        grids = {"visual/traversal": image_grid(latent_traversal(model, images, self.steps, 32), self.steps)}
        if model.latent_dim == 2:
            grids["visual/manifold"] = image_grid(manifold(model, images), 15)
        kl = kl_per_dim(model, images)
        if kl is not None:
            grids["visual/kl_per_dim"] = kl_chart(kl)
        return grids

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, AE) or not trainer.is_global_zero:
            return
        step, grids = self._latest  # the last validation's, unless training went on after it
        grids = dict(grids) if step == trainer.global_step else self._grids(pl_module)
        final = self._final_grids(pl_module)
        step = scalar_logging_step(trainer)
        for tag, grid in final.items():
            log_image(trainer.loggers, tag, grid, step)
        if self.dirpath is not None:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for tag, grid in (grids | final).items():
                with atomic(self.dirpath / f"{tag.rsplit('/', 1)[-1]}.png") as tmp:
                    save_image(grid, tmp, format="png")
        if pl_module.latent_dim == 2:
            return
        codes = pl_module.encode(self.images.to(pl_module.device)).cpu()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_embedding(
                    codes, metadata=self.labels.tolist(), label_img=self.images, global_step=trainer.global_step,
                    tag="latent",
                )  # fmt: skip


class CodeProbe(L.Callback):
    """+callbacks=probe: after every validation of an autoencoder, `val/probe_acc`, how well its codes classify with
    few labels while it trains: the validation images' accuracy under a cosine k-NN vote (`k` neighbours, probes.py)
    among the codes of data.probe_labels_per_class labelled training images per class. Their labels serve this
    diagnostic only; the autoencoder trains without them."""

    def __init__(self, k: int = 10, batch_size: int = 1000):
        self.k, self.batch_size = k, batch_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = isinstance(pl_module, AE)
        if self.active:
            datamodule, device = trainer.datamodule, pl_module.device
            images, labels = datamodule.probe_split()
            self.bank = images.to(device), labels.to(device)
            self.val = datamodule.inputs("val").to(device), datamodule.val_set.labels.to(device)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        bank_codes, val_codes = (
            torch.cat([pl_module.encode(x) for x in images.split(self.batch_size)])
            for images in (self.bank[0], self.val[0])
        )
        votes = knn_vote(val_codes, bank_codes, self.bank[1], self.k, trainer.datamodule.num_classes)
        accuracy = (votes.argmax(1) == self.val[1]).float().mean()  # the same on every process: `max` keeps it exact
        pl_module.log("val/probe_acc", accuracy, sync_dist=True, reduce_fx="max")


class NanGuard(L.Callback):
    """Stop every process at the first non-finite training loss, naming its step, and never save a non-finite state.

    Each step only keeps its (detached) loss: no host-device sync, no kernel. The losses are read every
    `every_n_steps` steps (those at which the loss is logged, so the two share one sync; 0: never) and before
    anything is saved (at validation's start and the epoch's end, when checkpoints are written), gathered from all
    processes, so every DDP process stops with the same error instead of the others hanging in their next
    all-reduce. Before a save the weights are checked too: a non-finite gradient can make them non-finite while the
    loss was still finite.
    """

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 0:
            raise UserError(
                f"callbacks.nan_guard.every_n_steps={every_n_steps} must be a number of steps (0: check only before "
                "each save), e.g. 10."
            )
        self.every_n_steps = every_n_steps
        self._losses: list[Tensor] = []  # the training losses since the last check ...
        self._steps: list[tuple[int, int]] = []  # ... and the (step, epoch) of each
        self._trained = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())
        self._steps.append((trainer.global_step, trainer.current_epoch))
        self._trained = True
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer, pl_module, weights=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, weights=True)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool = False) -> None:
        if not self._trained:  # no training step yet (the same on every process)
            return
        n, parameters = len(self._steps), list(pl_module.parameters())
        bad_weights = torch.zeros(1, device=parameters[0].device)
        if weights and not all_finite(p.detach() for p in parameters):  # the check SafeCheckpointIO makes (a sync)
            bad_weights += 1
        own = torch.cat([torch.stack(self._losses).float(), bad_weights]) if n else bad_weights
        rows = _from_every_process(trainer, own).cpu()
        steps, self._steps, self._losses = self._steps, [], []
        losses, bad = rows[:, :n], ~torch.isfinite(rows[:, :n])
        if bad.any():
            first = int(bad.any(0).int().argmax())
            step, epoch = steps[first]
            loss = losses[bad[:, first], first][0]
            stop = f"The training loss became non-finite (loss = {loss:.4g}) at step {step} (epoch {epoch})"
        elif rows[:, n].any():
            stop = "The weights became non-finite (a non-finite gradient, with a finite loss)"
        else:
            return
        last = write_last_state(trainer)
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written"
        raise EveryProcessError(
            f"{stop}, so training stopped (at step {trainer.global_step}) with nothing saved after it, and {kept}. "
            "Start again with a lower optimizer.lr, or for a VAE a smaller kl_weight or model.kl_warmup_epochs>0."
        )


def _from_every_process(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """`tensor` of every process, stacked (Lightning's all_gather goes through autograd's deprecated all_gather)."""
    if trainer.world_size == 1:
        return tensor[None]
    gathered = [torch.empty_like(tensor) for _ in range(trainer.world_size)]
    torch.distributed.all_gather(gathered, tensor)
    return torch.stack(gathered)


class Preemption(L.Callback):
    """On SIGTERM (what SLURM and other schedulers send before preemption or at a time limit) Lightning stops after the
    current step and exits with code 0, as if the run had finished; Ctrl-C (SIGINT) is made to stop the same way
    (on_fit_start). This says what was kept and how to resume, and makes the exit code 143 or 130 (128 + the signal),
    so a scheduler or script sees that the run did not finish (training.py turns Lightning's exit 1 after a second,
    immediate Ctrl-C into 130 too). The state to resume from is the last saved state's last.ckpt, written now if
    it was held in memory (LastCheckpoint); the steps since are trained again on resume, which keeps a resumed run
    exactly equal to one that never stopped. Under SLURM, hydra/launcher=slurm turns its preemption signal into SIGTERM
    and requeues the job after the stop; Lightning's own auto-requeue is off (training.py)."""

    def __init__(self) -> None:
        self.ctrl_c = False  # Ctrl-C asked for the stop
        self._sigint_handler: Any = None  # the handler to put back after fit

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Ctrl-C stops as SIGTERM does, at Lightning's next safe point between steps: a KeyboardInterrupt raised at
        any bytecode could land inside a checkpoint write or a thread's lock and corrupt it or hang the exit. A
        second Ctrl-C interrupts at once. (Python handles signals in its main thread only.)"""
        self.ctrl_c = False
        if threading.current_thread() is threading.main_thread():
            self._sigint_handler = signal.signal(signal.SIGINT, functools.partial(self._on_ctrl_c, trainer))

    def _on_ctrl_c(self, trainer: L.Trainer, number: int, frame: Any) -> None:
        if self.ctrl_c:
            raise KeyboardInterrupt
        self.ctrl_c = True
        stop_at_next_step(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
        if isinstance(exception, SIGTERMException) and self.ctrl_c:
            signal_name = "Ctrl-C (SIGINT)"
            exception.code = 130
        elif isinstance(exception, SIGTERMException):
            signal_name = "SIGTERM"
            exception.code = 143
        elif isinstance(exception, KeyboardInterrupt):
            signal_name = "Ctrl-C (SIGINT)"
        else:
            return
        last = write_last_state(trainer)
        kept = (
            f"{last} holds the last saved state; resume it with ckpt_path=last hydra.run.dir={last.parent.parent}"
            if last
            else "no state had been saved yet, so there is nothing to resume"
        )
        message = (
            f"error: stopped by {signal_name} at step {trainer.global_step} (epoch {trainer.current_epoch}); {kept}."
        )
        print(message, file=sys.stderr)
        to_log_file(message)  # train.log says how the run stopped, also where its console is a SLURM job's log


class BatchSeeds(L.Callback):
    """Seed torch's global generator from the stream (seed, "noise", epoch, batch, rank) before every training batch.

    Lightning restores weights, optimizer and loop counters from a checkpoint but not random states, so without this a
    VAE resumed after a crash would draw other noise than one that never stopped. With it (and the data module's
    batch order and binarisation, drawn from (seed, epoch) and (seed, epoch, batch)), a resumed run draws the same
    numbers as an uninterrupted one, from wherever its checkpoint was saved. Each batch has its own draws, also the
    batches whose gradients one optimizer step accumulates, and each DDP process its own noise.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        stream = stream_seed(self.seed, "noise", trainer.current_epoch, batch_idx, trainer.global_rank)
        seed_torch(stream, pl_module.device)
