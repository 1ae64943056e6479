"""The seven places where this project reaches past a public API, where none does the job; tests/test_internals.py
checks them against the installed Lightning and torch, so an upgrade that moves them fails there, not in a run."""

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


def scalar_logging_step(trainer: L.Trainer) -> int:
    """The step at which Lightning logs an epoch's validation scalars, so pictures logged then line up with them.

    It is Lightning's count of batches that stepped the optimizers, not `trainer.global_step`, which counts optimizer
    steps and so differs as soon as a model steps two optimizers per batch."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def add_summary(writer: SummaryWriter, summary: Summary, step: int | None = None) -> None:
    """Write a Summary protobuf that this project built itself into the writer's event file.

    SummaryWriter's public methods build their own protobufs: `add_image` always encodes RGB (a grey grid encodes 5x
    faster as one channel) and `add_hparams` writes a second run per call, where the HParams tab needs the session
    record in the run's own event file."""
    writer._get_file_writer().add_summary(summary, step)


def stop_at_next_step(trainer: L.Trainer) -> None:
    """Make Lightning stop at its next safe point, as after SIGTERM: the loops raise SIGTERMException between steps
    (and agree on it across DDP processes), never inside a step or a checkpoint write."""
    trainer._signal_connector.received_sigterm = True


def batches_trained(trainer: L.Trainer) -> int:
    """How many batches of the current training epoch were trained: 0 at an epoch's start, k in a run resumed from a
    checkpoint saved after the epoch's k-th batch (Lightning restores it with its loops), and, during a training
    batch's transfer to the device, that batch's index in its epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def accumulating(trainer: L.Trainer) -> bool:
    """Whether the current batch's gradients wait for more batches' before the optimizer steps
    (trainer.accumulate_grad_batches): a state saved then would lose them."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def checkpoint_of(trainer: L.Trainer, weights_only: bool = False) -> dict:
    """The checkpoint dict that `trainer.save_checkpoint` would write now, without writing it: so a callback can keep
    an epoch's state in memory and write it later (callbacks.LastCheckpoint).

    Lightning asks no callback about a weights-only checkpoint, so under +callbacks=ema (WeightAveraging) the best
    checkpoint would hold the current weights while the average was validated and chosen: its weights are the
    average's here, as in a full checkpoint (where WeightAveraging keeps the current ones for resuming)."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
    if weights_only:
        for callback in trainer.callbacks:
            if isinstance(callback, WeightAveraging):
                callback.on_save_checkpoint(trainer, trainer.lightning_module, checkpoint)
                for key in ("current_model_state", "averaging_state"):  # only for resuming
                    checkpoint.pop(key, None)
    return checkpoint


# The hooks Lightning calls for every batch, all through trainer/call.py's _call_callback_hooks.
BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end",
)  # fmt: skip


def skip_inherited_batch_hooks(callback: L.Callback) -> None:
    """Make Lightning skip the per-batch hooks that `callback` inherits unchanged from L.Callback (no-ops).

    Lightning calls every hook of every callback, each call about 3 us on a CPU (it formats a profiler name from the
    callback's state key): with 8 callbacks, ~140 us a training step spent calling no-ops, a third of a small model's
    step on a GPU. Its dispatch skips an attribute that is not callable, so the inherited hooks are set to None."""
    for name in BATCH_HOOKS:
        if getattr(type(callback), name) is getattr(L.Callback, name):
            setattr(callback, name, None)
