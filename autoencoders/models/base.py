"""What every model shares: split steps, epoch means, the optimizer hook, and the registry."""

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor

from autoencoders.checkpoints import MODELS
from autoencoders.data.batches import split_position
from autoencoders.optim import OptimizerFactory, configure_optimizers, default_optimizer
from autoencoders.seeds import seed_torch, stream_seed


class SplitSteps(L.LightningModule):
    """Training, validation and test steps that are one `_step(batch, split)`, differing only in the split's name,
    and the optimizer and schedule of conf/optimizer and conf/scheduler (optim.py) over `parameter_groups()`.

    `selection` is the validation metric, and whether higher is better, that picks a run's best checkpoint. Every
    subclass registers itself in MODELS (checkpoints.py), and its checkpoints record its name, which is all that
    `autoencoders.load` needs to rebuild it.
    """

    selection: tuple[str, str] = ("val/loss", "min")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODELS[cls.__name__] = cls

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autoencoders_class"] = type(self).__name__

    def __init__(self, optimizer: OptimizerFactory | None = None, scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.optimizer, self.scheduler = optimizer or default_optimizer, scheduler

    def parameter_groups(self) -> Iterable:
        return self.parameters()

    def setup(self, stage: str) -> None:
        if stage == "fit" and not all(p.requires_grad for p in self.parameters()):  # a frozen pretrained encoder
            # (a classifier's, M1+M2's M1) stays in eval mode on purpose; Lightning's warning asks nothing of the user
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
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
        position = split_position(batch_idx, self.global_rank, self.trainer.world_size)
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=False), torch.random.fork_rng([self.device] if cuda else []):
            seed_torch(stream_seed(0, split, position), self.device)  # the same whatever the run's seed
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if "train" in self._sums:  # saved inside an epoch: a resumed run's epoch means cover the batches before too
            names, sums = self._sums["train"]
            checkpoint["train_epoch_sums"] = {"names": names, "sums": sums, "count": self._counts["train"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "train_epoch_sums" in checkpoint:
            saved = checkpoint["train_epoch_sums"]
            self._sums["train"] = saved["names"], saved["sums"].to(self.device)
            self._counts["train"] = saved["count"]

    def on_train_epoch_end(self) -> None:
        self._log_means("train", "_epoch")

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_means("test")


def minimised(terms: dict[str, Tensor]) -> Tensor:
    """Of a model's `loss_terms`, the one it minimises: `loss`, or `recon` for a plain AE, whose loss it is."""
    return terms["loss"] if "loss" in terms else terms["recon"]
