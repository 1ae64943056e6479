"""Faults in training: checkpoints that neither a kill nor a power cut can corrupt, a NaN/Inf guard, and seeds that
make resumes exact."""

import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from autoencoders.errors import UserError


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, durable, finite-only checkpoint files, read back with `weights_only=True`.

    A save is written, with the zip's CRC32 records, to `.<name>.part` beside its target: on the training thread,
    since the tensors change with the next step. A background thread then makes the file durable (fsync), gives it
    the target's name atomically, and makes the rename durable (fsync of the folder); the replaced file is gone only
    then. So at every moment the target is a complete checkpoint that survives a kill and a power cut or node crash,
    and the training thread does not wait for the disk. One save is in flight at a time: the next save, a removal, a
    load and the end of training wait for it. A checkpoint whose weights or optimizer state hold NaN or Inf is
    refused, so the last good one is never replaced by a broken model.
    """

    def __init__(self) -> None:
        super().__init__()
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-fsync")
        self._pending: Future | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        if not _all_finite(_float_tensors([checkpoint.get("state_dict"), checkpoint.get("optimizer_states")])):
            raise UserError(
                f"The model's weights or optimizer state hold NaN or Inf values, so {path} was not written and the "
                "previous checkpoint is kept. Start again with a lower model.lr."
            )
        self.wait()
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")  # one writer per target (rank 0), so a fixed name suffices
        with open(part, "wb") as f:
            torch.save(checkpoint, f)
        self._pending = self._disk.submit(_durably_replace, part, path)

    def wait(self) -> None:
        """Until the save in flight, if any, is durable in place (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None):
        """Always `weights_only=True`: this project's checkpoints hold only tensors and plain containers."""
        self.wait()
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)

    def teardown(self) -> None:
        self.wait()
        super().teardown()


def _durably_replace(src: Path, dst: Path) -> None:
    """`os.replace(src, dst)`, with src's data on disk before and the rename on disk after."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    folder = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """No NaN or Inf in any of `tensors`, with one reduction per tensor and one device sync in the usual case.

    A NaN or Inf makes a sum non-finite, so a finite sum proves every element finite; only a sum that overflows needs
    the element-wise check.
    """
    tensors = list(tensors)
    if not tensors or torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()):
        return True
    return all(torch.isfinite(t).all() for t in tensors)


def _float_tensors(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _float_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _float_tensors(value)


class NanGuard(L.Callback):
    """Stop at the first non-finite training loss, before its backward pass and optimizer step change the weights.

    The error names the step; nothing is saved after it, so the last checkpoint on disk is the last good state. The
    gradients are not read: that costs 5% of a small model's step, and a non-finite gradient shows up as a non-finite
    loss one step later (its weights are then never saved, as SafeCheckpointIO refuses them).
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if torch.isfinite(loss):  # one device sync per step
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        last = Path(dirpath, "last.ckpt") if dirpath else None
        kept = f"the last good checkpoint, {last}, is kept" if last and last.is_file() else "no checkpoint was written"
        raise UserError(
            f"The training loss became non-finite (loss = {loss.item():.4g}) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}), so training stopped before that step changed the weights, and {kept}. "
            "Start again with a lower model.lr, or for a VAE a smaller kl_weight or model.kl_warmup_epochs>0."
        )


class Preemption(L.Callback):
    """On SIGTERM (what SLURM and other schedulers send before preemption or at a time limit) Lightning stops after the
    current step and exits with code 0, as if the run had finished. This says what was kept and exits 143 (128 +
    SIGTERM) instead, so a scheduler or script sees that the run did not finish. The state to resume from is the last
    finished epoch's last.ckpt, already on disk; the unfinished epoch is trained again on resume, which keeps a resumed
    run exactly equal to one that never stopped. Under SLURM, Lightning's own SLURM plugin requeues on its signal."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        last = Path(dirpath, "last.ckpt") if dirpath else None
        kept = (
            f"{last} holds the last finished epoch; resume it with ckpt_path=last hydra.run.dir={last.parent.parent}"
            if last and last.is_file()
            else "no epoch had finished, so there is nothing to resume"
        )
        print(f"error: stopped by SIGTERM at step {trainer.global_step} (epoch {trainer.current_epoch}); {kept}.",
              file=sys.stderr)  # fmt: skip
        exception.code = 143


class EpochSeeds(L.Callback):
    """Reseed torch's global random generator from (seed, epoch) at the start of every training epoch.

    Lightning restores weights, optimizer and loop counters from a checkpoint but not random states, so without this a
    VAE resumed after a crash would draw other noise than one that never stopped. With it (and the data module's
    shuffle state, which travels in the checkpoint), a run resumed from an end-of-epoch checkpoint such as last.ckpt
    draws the same numbers as an uninterrupted one.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(hash((self.seed, trainer.current_epoch)))  # deterministic for ints, in torch's range
