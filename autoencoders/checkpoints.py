"""Checkpoint files: written so that neither a kill nor a power cut can corrupt them (SafeCheckpointIO), and read
safely (weights_only=True: tensors and plain containers, no arbitrary code)."""

import importlib
import os
import pickle
import signal
import threading
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import Tensor

from autoencoders.errors import UserError
from autoencoders.files import name_in_error, record

# The registry: every model class by the name its checkpoints record (models/base.py registers each subclass);
# importing autoencoders.models fills it.
MODELS: dict[str, type[L.LightningModule]] = {}


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, durable, finite-only checkpoint files, read back with `weights_only=True`.

    A save is written, with the zip's CRC32 records, to `.<name>.part` beside its target: on the training thread,
    since the tensors change with the next step. A background thread then makes the file durable (fsync), gives it
    the target's name atomically, and makes the rename durable (fsync of the folder); the replaced file is gone only
    then. So at every moment the target is a complete checkpoint that survives a kill and a power cut or node crash,
    and the training thread does not wait for the disk. One save per file is in flight at a time: the next save of
    that file waits for it, a load and the end of training for all; a removal queues behind every save before it. A
    checkpoint whose weights or optimizer state hold NaN or Inf is refused, so the last good one is never replaced by
    a broken model.
    """

    def __init__(self) -> None:
        super().__init__()
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-fsync")
        self._pending: dict[Path, Future] = {}  # by target file

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        if not all_finite(_float_tensors([checkpoint.get("state_dict"), checkpoint.get("optimizer_states")])):
            raise UserError(
                f"The model's weights or optimizer state hold NaN or Inf values, so {path} was not written and the "
                "previous checkpoint is kept. Start again with a lower optimizer.lr."
            )
        with signals_deferred():
            self.wait(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.part")  # one writer per target (rank 0), so a fixed name suffices
            try:
                with open(part, "wb") as f:
                    torch.save(checkpoint, f)
            except BaseException as e:  # a full disk: torch's RuntimeError from the OSError, which names no file
                part.unlink(missing_ok=True)
                name_in_error(e, path)
                raise
            self._pending[path] = self._disk.submit(_durably_replace, part, path)

    def wait(self, path: Path | None = None) -> None:
        """Until the saves in flight (of `path`, or all of them) are durable in place, re-raising an error."""
        with signals_deferred():
            for target in [path] if path is not None else list(self._pending):
                pending = self._pending.pop(target, None)
                if pending is not None:
                    pending.result()

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Queued behind every save in flight: a file is gone only once the saves that replace it are durable."""
        path = Path(path)
        with signals_deferred():
            self.wait(path)
            self._pending[path] = self._disk.submit(_durably_remove, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None):
        """Always `weights_only=True`: this project's checkpoints hold only tensors and plain containers."""
        self.wait()
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)

    def teardown(self) -> None:
        self.wait()
        super().teardown()


def _durably_replace(src: Path, dst: Path) -> None:
    """`os.replace(src, dst)`, with src's data on disk before and the rename on disk after; src is removed if that
    fails."""
    try:
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.replace(src, dst)
    except BaseException as e:
        src.unlink(missing_ok=True)
        name_in_error(e, dst)
        raise
    _sync_folder(dst.parent)
    record(dst)  # a file the project wrote (files.py): a run started again in its dir may remove it


def _durably_remove(path: Path) -> None:
    if path.exists():
        path.unlink()
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a removal) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """No NaN or Inf in any of `tensors`, with one reduction per tensor and one device sync in the usual case.

    A NaN or Inf makes a sum non-finite, so a finite sum proves every element finite; only a sum that overflows needs
    the element-wise check.
    """
    tensors = list(tensors)
    if not tensors or torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()):
        return True
    return all(torch.isfinite(t).all() for t in tensors)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM that arrive inside the block reach their handlers when it ends: a KeyboardInterrupt
    raised inside torch.save leaves a corrupt zip writer (whose RuntimeError then hides the interrupt: exit 1), and one
    inside a thread wait can hang the exit. Python runs signal handlers in the main thread only (and only there can
    they be swapped), so elsewhere the block defers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    handlers = {number: handler for number, handler in handlers.items() if handler is not None}  # not set from C
    for number in handlers:
        signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)


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


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, or a UserError saying why the file is not a usable checkpoint."""
    path = Path(path)
    if path.is_dir():
        ckpts = sorted(path.glob("checkpoints/*.ckpt")) or sorted(path.glob("*.ckpt"))
        hint = f"; it holds {', '.join(str(p.relative_to(path)) for p in ckpts[:3])}" if ckpts else ""
        raise UserError(
            f"Checkpoint {str(path)!r} is a folder, not a checkpoint file{hint}. "
            "Pass the path of a .ckpt file, e.g. <run_dir>/checkpoints/last.ckpt."
        )
    if not path.is_file():
        raise UserError(
            f"Checkpoint {str(path)!r} does not exist. "
            "Pass the path of a .ckpt file, e.g. <run_dir>/checkpoints/last.ckpt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "It may be truncated by an interrupted copy or not be a checkpoint at all; use another .ckpt file."
        ) from None
    kind = ckpt.get("autoencoders_class") if isinstance(ckpt, dict) else None
    importlib.import_module("autoencoders.models")  # registers every model class, whichever module saved it
    if kind not in MODELS:
        raise UserError(
            f"{str(path)!r} is not a checkpoint written by this project's train.py (no known 'autoencoders_class'). "
            f"Use a checkpoint of one of: {', '.join(sorted(MODELS))}."
        )
    return ckpt


def check_fits(ckpt: dict, model: L.LightningModule, path: str | Path) -> None:
    """Raise a UserError unless `ckpt` (from read_checkpoint) holds weights of `model`'s class and shapes."""
    kind = ckpt["autoencoders_class"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if kind == type(model).__name__ and shapes == {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}:
        return
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in ckpt["hyper_parameters"].items()}
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in model.hparams.items()}
    differ = [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in ours.items() if saved.get(k, v) != v]
    raise UserError(
        f"{str(path)!r} holds a {kind} whose weights do not fit this run's {type(model).__name__}"
        + (f": it was trained with {', '.join(differ)}" if differ else "")
        + ". Use the model and data settings it was trained with (its run's .hydra/config.yaml), or ckpt_path=null "
        "to start from scratch."
    )


def load(path: str | Path) -> L.LightningModule:
    """Rebuild the right LightningModule for any checkpoint written by train.py, in eval mode on the CPU, for
    inference: its parameters do not require gradients, so neither do its outputs (`float(model.elbo(x).mean())`
    needs no `torch.no_grad()`). To train it further, train.py starts a new run from it (ckpt_path=<checkpoint>)."""
    ckpt = read_checkpoint(path)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "lr"}  # older versions' (now conf/optimizer)
    model = MODELS[ckpt["autoencoders_class"]](**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval().requires_grad_(False)
