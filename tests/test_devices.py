"""Precision and devices: fp32 held-out metrics whatever the training precision, trainer=gpu's precision, memory
formats, and on CUDA a steady training step with no host-device sync (skipped without CUDA)."""

import shutil

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from autoencoders.training import build, train
from tests.helpers import ROOT, TINY, compose_train

CONV_VAE = [*TINY, "model=conv_vae", "latent_dim=2", "model.nll_samples=5", "trainer.limit_test_batches=2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_held_out_metrics_are_fp32_whatever_the_training_precision(tmp_path):
    """A run trained in bf16-mixed reports val and test metrics equal to an fp32 re-test of its best checkpoint."""
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    trained = train(compose_train(bf16, *CONV_VAE, "+trainer.precision=bf16-mixed"))
    shutil.copytree(bf16, fp32)
    retested = train(compose_train(fp32, *CONV_VAE, "+trainer.precision=32", "ckpt_path=last"))  # tests only
    assert {"test/elbo", "test/nll"} <= trained.keys()
    assert trained == pytest.approx(retested, rel=1e-6, abs=1e-6)


def gpu_trainer_config():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", ["trainer=gpu"]).trainer


def test_trainer_gpu_is_mixed_precision_in_bf16_or_16_bit():
    assert gpu_trainer_config().precision in ("bf16-mixed", "16-mixed")


@needs_cuda
def test_trainer_gpu_uses_bf16_where_the_gpu_computes_it_else_16_bit_with_a_gradient_scaler():
    trainer = instantiate(gpu_trainer_config(), logger=False)
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert trainer.precision == ("bf16-mixed" if native_bf16 else "16-mixed")
    assert (getattr(trainer.precision_plugin, "scaler", None) is None) == native_bf16


def fit_a_step(tmp_path, *overrides: str) -> L.LightningModule:
    cfg = compose_train(tmp_path, *overrides)
    datamodule, model = build(cfg)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule)
    return model


def conv_weight(model: L.LightningModule) -> torch.Tensor:
    return next(p for p in model.encoder.parameters() if p.dim() == 4)


def test_conv_weights_are_channels_last_on_cpus_where_that_was_measured_faster(tmp_path):
    model = fit_a_step(tmp_path, "model=conv_ae", "latent_dim=2", "trainer.accelerator=cpu")
    assert conv_weight(model).is_contiguous(memory_format=torch.channels_last)


@needs_cuda
def test_conv_weights_keep_torchs_default_memory_format_on_gpus(tmp_path):
    model = fit_a_step(tmp_path, "model=conv_ae", "latent_dim=2", "trainer=gpu")
    assert conv_weight(model).is_contiguous()


class SyncsAreErrors(L.Callback):
    """From the end of one training step to the end of the next (the last callback's on_train_batch_end), that whole
    next step runs under torch.cuda.set_sync_debug_mode("error"): fetching and moving its batch, forward, backward,
    optimizer step and every callback. Steps that log (and so read the loss) are left out, and the first two
    (lazy initialisation)."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        upcoming, every = trainer.global_step, trainer.log_every_n_steps
        steady = upcoming >= 2 and upcoming % every != 0 and batch_idx + 1 < trainer.num_training_batches
        torch.cuda.set_sync_debug_mode("error" if steady else "default")
        self.steps += steady

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("model", ["vae", "conv_vae"])
def test_a_steady_training_step_on_cuda_never_syncs_with_the_host(tmp_path, model):
    check = SyncsAreErrors()
    try:
        cfg = compose_train(tmp_path, "trainer=gpu", f"model={model}", "latent_dim=8", "trainer.max_epochs=1",
                            "trainer.limit_train_batches=30", "trainer.limit_test_batches=1")  # fmt: skip
        train(cfg, [check])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check.steps >= 20
