"""What `python train.py` does once Hydra has composed the config: data -> model -> Trainer -> metrics.json."""

import json
import os
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from autoencoders.callbacks import ImageLogger
from autoencoders.errors import UserError
from autoencoders.models import AE


def check_config(cfg: DictConfig) -> None:
    """Reject bad top-level values before anything is built or written."""
    if not isinstance(cfg.latent_dim, int) or cfg.latent_dim <= 0:
        raise UserError(f"latent_dim={cfg.latent_dim} is not a positive integer. Set e.g. latent_dim=16.")
    if not isinstance(cfg.kl_weight, int | float) or cfg.kl_weight < 0:
        raise UserError(
            f"kl_weight={cfg.kl_weight} is not a non-negative number. Set e.g. kl_weight=1 (the standard VAE)."
        )


def write_json(path: Path, data: dict) -> None:
    """Write atomically, so a crash never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model, image_shape=datamodule.image_shape, _convert_="all")

    logger = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            save_last=True,
        ),
        RichProgressBar(),
    ]
    if isinstance(model, AE):
        callbacks.append(ImageLogger())
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    val = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test_ckpt = "best" if callbacks[0].best_model_path else None
    test = trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)[0]
    metrics = {**val, **test}
    if trainer.is_global_zero:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True), metrics=val, step=trainer.global_step)
        write_json(run_dir / "metrics.json", metrics)
    return metrics
