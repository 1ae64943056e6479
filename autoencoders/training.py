"""What `python train.py` does once Hydra has composed the config: data -> model -> Trainer -> metrics.json."""

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from autoencoders.callbacks import ImageLogger, ProgressBar
from autoencoders.console import metrics_table
from autoencoders.data import ImageDataModule
from autoencoders.errors import UserError
from autoencoders.faults import EpochSeeds, NanGuard, Preemption, SafeCheckpointIO
from autoencoders.likelihoods import for_data
from autoencoders.models import AE
from autoencoders.rundirs import check_run_dir, finished, last_checkpoint, resume_checkpoint, resumes_in_place
from autoencoders.sweeps import check_launchable

log = logging.getLogger(__name__)

# Lightning's messages that no user of train.py can act on, silenced one by one (not by category):
# a deprecation inside Lightning's own pytree code; the logging-interval warning, which does not apply because epoch
# metrics and `train/*_step` are logged by global step, across epochs; and an advertisement for a cloud logger.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud logging")
)


def check_config(cfg: DictConfig) -> None:
    """Reject bad top-level values before anything is built or written."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"Required setting(s) {', '.join(missing)} have no value (??? in the config). "
            f"Pass them on the command line, e.g. {missing[0]}=<value>."
        )
    if not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed} is not an integer. Set e.g. seed=0; initialisation and noise depend on it.")
    if not isinstance(cfg.latent_dim, int) or cfg.latent_dim <= 0:
        raise UserError(f"latent_dim={cfg.latent_dim} is not a positive integer. Set e.g. latent_dim=16.")
    if not isinstance(cfg.images_every_n_epochs, int) or cfg.images_every_n_epochs < 1:
        raise UserError(
            f"images_every_n_epochs={cfg.images_every_n_epochs} is not a positive integer. Set e.g. "
            "images_every_n_epochs=1 to log the image grids after every validation epoch."
        )
    if not isinstance(cfg.compile, bool):
        raise UserError(f"compile={cfg.compile} is not a boolean. Set compile=true or compile=false.")
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs == 0 or max_epochs < -1):
        raise UserError(
            f"trainer.max_epochs={max_epochs} is no number of epochs to train. Set a positive one, e.g. "
            "trainer.max_epochs=50 (or -1 together with a trainer.max_steps limit)."
        )
    if max_epochs == -1 and max_steps in (None, -1):
        raise UserError(
            "trainer.max_epochs=-1 with no trainer.max_steps would train forever. Set trainer.max_epochs=50, say, or "
            "a step limit such as trainer.max_steps=5000."
        )
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={cfg.trainer.accelerator} (e.g. trainer=gpu), but PyTorch sees no CUDA GPU here. "
            "Use trainer=default (the best device available) or trainer=cpu."
        )
    if not isinstance(cfg.kl_weight, int | float) or cfg.kl_weight < 0:
        raise UserError(
            f"kl_weight={cfg.kl_weight} is not a non-negative number. Set e.g. kl_weight=1 (the standard VAE)."
        )


def write_json(path: Path, data: dict) -> None:
    """Write atomically, so a crash never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def build(cfg: DictConfig) -> tuple[ImageDataModule, L.LightningModule]:
    """The set-up data module, and the model built for it from `cfg`.

    Every model gets the data's image shape. One whose config declares num_classes (the classifier) gets that too, and
    an autoencoder whose likelihood is null gets the data's (bernoulli on binarised data)."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    needs = {"num_classes": datamodule.num_classes} if "num_classes" in cfg.model else {}
    if "likelihood" in cfg.model:
        needs["likelihood"] = for_data(cfg.model.likelihood, datamodule.hparams.binarize)
    return datamodule, instantiate(cfg.model, image_shape=datamodule.image_shape, **needs, _convert_="all")


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint by the model's validation selection metric, weights only (it is for testing and evaluation,
    so it skips the optimizer state: 2/3 of an Adam-trained model's bytes). `val_metrics` are the validation metrics
    of the epoch that saved it, so metrics.json reports val and test of one and the same checkpoint."""

    def __init__(self, dirpath: Path, selection: tuple[str, str]):
        monitor, mode = selection
        super().__init__(
            dirpath=dirpath,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_weights_only=True,
        )
        self.val_metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:  # in last.ckpt, so a resumed run reports its best's metrics too
        return {**super().state_dict(), "val_metrics": self.val_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.val_metrics = state_dict.get("val_metrics", {})

    # Lightning saves at the end of the training epoch when validation ran just before it, else at validation's end.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._noting_a_new_best(super().on_train_epoch_end, trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._noting_a_new_best(super().on_validation_end, trainer, pl_module)

    def _noting_a_new_best(self, save, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self.best_model_path
        save(trainer, pl_module)
        if self.best_model_path != before:  # a new best has a new file name (epoch, or a -v1 suffix)
            self.val_metrics = latest_val_metrics(trainer)


def latest_val_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The latest validation epoch's metrics."""
    return {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, float]:
    """Train, test and write metrics.json; `extra_callbacks` (e.g. a benchmark's timer) join the standard ones."""
    check_config(cfg)
    logging.getLogger("lightning").handlers.clear()  # Hydra's handlers already print and log to <run>/train.log
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if finished(run_dir, hydra.mode):
        log.info("Job %s finished in an earlier run of this sweep: skipped, its files left as they were", run_dir.name)
        return json.loads((run_dir / "metrics.json").read_text())
    if hydra.mode == RunMode.MULTIRUN and cfg.ckpt_path is None and last_checkpoint(run_dir).is_file():
        log.info("Job %s stopped in an earlier run of this sweep: resuming it from its last.ckpt", run_dir.name)
        cfg.ckpt_path = "last"
    check_run_dir(run_dir, cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)

    datamodule, model = build(cfg)
    ckpt_path = resume_checkpoint(cfg.ckpt_path, run_dir, model)
    if resumes_in_place(cfg.ckpt_path, run_dir):  # its checkpoints dir holds the run's own checkpoints, as it should
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(run_dir))}.* exists and is not")
    if cfg.compile:
        for net in model.children():  # in place, so parameter names and checkpoints stay as without
            net.compile()

    logger = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
    best = BestCheckpoint(run_dir / "checkpoints", model.selection)
    callbacks = [
        best,
        # last.ckpt has its own callback, because since Lightning 2.6 `save_last=True` rewrites it only in the epochs
        # that also save a best checkpoint, so a resume would repeat every epoch since the best. No monitor: every
        # epoch's end state, always to last.ckpt (no last-v1.ckpt when a moved run resumes).
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False),
        ProgressBar(),
        NanGuard(),
        Preemption(),
        EpochSeeds(cfg.seed),
    ]
    if isinstance(model, AE):
        callbacks.append(ImageLogger(every_n_epochs=cfg.images_every_n_epochs))
    callbacks += extra_callbacks or []
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=[SafeCheckpointIO()])
    check_launchable(trainer)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    # The best checkpoint by validation is tested; without one (fast_dev_run), the weights as they are, with the
    # validation metrics of the last epoch.
    test_ckpt = best.best_model_path or None
    val = best.val_metrics if test_ckpt else latest_val_metrics(trainer)
    test = trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False, weights_only=True)[0]
    metrics = {**val, **test}
    if trainer.is_global_zero:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True), metrics=val, step=trainer.global_step)
        logger.finalize("success")  # flush: the writer's queue is not always written out at interpreter exit
        write_json(run_dir / "metrics.json", metrics)
        chosen = Path(test_ckpt).name if test_ckpt else "the final weights"
        log.info(
            "Run dir: %s\nMetrics of %s (nats per image unless noted), in metrics.json:\n%s",
            *(run_dir, chosen, metrics_table(dict(sorted(metrics.items())))),
        )
    return metrics
