"""Faults in training: checkpoints that a kill cannot corrupt, a NaN/Inf guard, and seeds that make resumes exact."""

import ctypes
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import Tensor
from torch.utils.serialization import config as serialization_config

from autoencoders.errors import UserError


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, finite-only checkpoint files, read back with `weights_only=True`.

    Each save goes to `.<name>.part` beside its target and then takes its name atomically, so a kill at any moment
    leaves either the old file or the new one. (Lightning's own save stages the file in the system temp dir and moves
    it, which becomes a plain copy into the target when /tmp is another filesystem.) This guards against kills, not
    power loss: files are not fsynced, which would slow every epoch (Lightning does not either). For the same reason
    the zip records carry no CRC32 (computing it is 60% of serialising), which torch.load does not need. A checkpoint
    whose weights or optimizer state hold NaN or Inf is refused, so the last good one is never replaced by a broken
    model.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        if not _all_finite(_float_tensors([checkpoint.get("state_dict"), checkpoint.get("optimizer_states")])):
            raise UserError(
                f"The model's weights or optimizer state hold NaN or Inf values, so {path} was not written and the "
                "previous checkpoint is kept. Start again with a lower model.lr."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")  # one writer per target (rank 0), so a fixed name suffices
        with open(part, "wb") as f, serialization_config.patch({"save.compute_crc32": False}):
            torch.save(checkpoint, f)
        _replace(part, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None):
        """Always `weights_only=True`: this project's checkpoints hold only tensors and plain containers."""
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


_renameat2 = getattr(ctypes.CDLL(None), "renameat2", None) if sys.platform == "linux" else None  # glibc >= 2.28
_RENAME_EXCHANGE = 2


def _replace(src: Path, dst: Path) -> None:
    """`os.replace(src, dst)`, but on Linux by atomically swapping the two names and then deleting the old file.

    Renaming over an existing file makes ext4 write out the new file's data at once (its auto_da_alloc guard), which
    costs a small model's 13 MB last.ckpt about 12 ms per epoch. A swap (renameat2 RENAME_EXCHANGE) is just as atomic
    and skips that; where the filesystem or C library lacks it, this falls back to os.replace.
    """
    at_cwd = -100  # AT_FDCWD: paths relative to the working directory, as os.replace takes them
    if _renameat2 is not None and _renameat2(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        os.unlink(src)
    else:
        os.replace(src, dst)


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
