"""The seven private APIs this project uses (autoencoders/internals.py), checked against the installed Lightning and
torch: an upgrade that moves or changes them fails here."""

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from autoencoders.internals import (
    BATCH_HOOKS,
    accumulating,
    add_summary,
    batches_trained,
    checkpoint_of,
    scalar_logging_step,
    skip_inherited_batch_hooks,
    stop_at_next_step,
)
from autoencoders.models import AE


def test_pictures_are_logged_at_the_step_of_lightnings_validation_scalars(tmp_path):
    x = torch.rand(24, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(24)), batch_size=4)  # 6 batches, 3 optimizer steps an epoch
    steps = []

    class RecordStep(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                steps.append(scalar_logging_step(trainer))

    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, logger=logger, callbacks=[RecordStep()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(AE((1, 8, 8), latent_dim=2), loader, loader)
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    logged = [int(row["step"]) for row in rows if row["val/recon"]]
    assert steps == logged == [2, 5]  # not global_step (3, 6)


def test_a_summary_built_here_reaches_the_event_file(tmp_path):
    writer = SummaryWriter(tmp_path)
    add_summary(writer, Summary(value=[Summary.Value(tag="check", simple_value=1.5)]), 7)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("check")] == [(7, 1.5)]


def test_a_requested_stop_is_what_lightning_reads_as_sigterm():
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    assert not trainer.received_sigterm
    stop_at_next_step(trainer)
    assert trainer.received_sigterm  # what its loops check between steps, raising SIGTERMException


def test_the_checkpoint_held_in_memory_is_what_save_checkpoint_writes(tmp_path):
    x = torch.rand(8, 1, 8, 8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)  # fmt: skip
    trainer.fit(AE((1, 8, 8), latent_dim=2), DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    saved, held = torch.load(tmp_path / "saved.ckpt", weights_only=True), checkpoint_of(trainer)
    assert held.keys() == saved.keys() and held["global_step"] == saved["global_step"] == 2
    assert all(torch.equal(held["state_dict"][k], v) for k, v in saved["state_dict"].items())
    assert "optimizer_states" not in checkpoint_of(trainer, weights_only=True)


def test_lightning_skips_the_batch_hooks_a_callback_inherits_and_calls_those_it_overrides(tmp_path):
    calls = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls.append(batch_idx)

    recorder, plain = Recorder(), L.Callback()
    for callback in (recorder, plain):
        skip_inherited_batch_hooks(callback)
    assert all(getattr(plain, name) is None for name in BATCH_HOOKS)
    assert callable(recorder.on_train_batch_end) and recorder.on_before_zero_grad is None
    x = torch.rand(8, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[recorder, plain], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(AE((1, 8, 8), latent_dim=2), loader, loader)
    trainer.test(trainer.lightning_module, loader)
    assert calls == [0, 1]  # each BATCH_HOOKS name is a hook Lightning dispatches, skipping None
    assert all(hasattr(L.Callback, name) for name in BATCH_HOOKS)


def test_the_epochs_trained_batches_and_whether_a_step_accumulates_are_lightnings_loop_counters():
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # before the batch counts
            seen.append((batch_idx, batches_trained(trainer), accumulating(trainer)))

    x = torch.rand(20, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=4)  # 5 batches, 2 a step: the last steps alone
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(AE((1, 8, 8), latent_dim=2), loader)
    epoch = [(0, 0, True), (1, 1, False), (2, 2, True), (3, 3, False), (4, 4, False)]
    assert seen == epoch + epoch
