"""The loggers of conf/logger, and what train.py writes to each beyond Lightning's scalars: the run's
hyperparameters, and image grids to every logger that takes images (TensorBoard, wandb, MLflow; not CSV)."""

import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch import Tensor

from autoencoders.errors import UserError
from autoencoders.internals import add_summary
from autoencoders.pictures import add_grid

# targets that need an optional extra: (the module it imports, the extra that installs it)
OPTIONAL = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb"),
    "autoencoders.loggers.mlflow_logger": ("mlflow", "mlflow"),
}
NOT_HPARAMS = ("logger", "callbacks", "ckpt_path")
RUN_NAME_KEYS = ("name", "run_name")  # wandb's and MLflow's: null is the run dir's name


def build_loggers(configs: DictConfig | None, run_name: str) -> list[Logger]:
    """One Lightning logger per entry of `configs` (the `logger` node), in order."""
    loggers = []
    for key, config in (configs or {}).items():
        module, extra = OPTIONAL.get(config.get("_target_"), (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise UserError(
                f"logger={key} needs the {module} package, which is not installed. Install it with "
                f'pip install -e ".[{extra}]", or choose another logger (logger=tensorboard, csv, wandb or mlflow).'
            )
        names = {k: run_name for k in RUN_NAME_KEYS if k in config and config[k] is None}
        loggers.append(instantiate(config, **names))
    return loggers


def finish(loggers: list[Logger]) -> None:
    """Flush each logger and close its run (call on rank 0), so that the next job of a sweep in this process starts
    its own run: wandb would otherwise go on logging into this one."""
    for logger in loggers:
        logger.finalize("success")  # a writer's queue is not always written out at interpreter exit
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def mlflow_logger(tracking_uri: str, **kwargs: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger. MLflow 3 refuses a local file store (`file:` URI) unless asked to allow it: a run dir's
    own store is what this logger is for by default, so that is allowed."""
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)


def run_hparams(cfg: DictConfig, choices: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The run's settings as flat `group.key` hparams: each config group's choice (`model`: `vae`) and every config
    value, but `_target_` and `_partial_`, values that repeat another by interpolation (`model.latent_dim`:
    `${latent_dim}`), where the run logs and saves (`logger`, `callbacks`: paths that differ in every run) and what it
    resumed from (`ckpt_path`). Numbers and booleans stay what they are; null is `null`, and lists are written as in
    the config (`[64, 32]`)."""
    flat = {group: choice for group, choice in choices.items() if not group.startswith("hydra") and choice is not None}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            skipped = key in ("_target_", "_partial_") or (not prefix and key in NOT_HPARAMS)
            if skipped or OmegaConf.is_interpolation(node, key):
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{key}.")
            else:
                is_list = isinstance(value, ListConfig)
                flat[f"{prefix}{key}"] = OmegaConf.to_container(value, resolve=True) if is_list else value

    walk(cfg, "")
    return {k: v if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in flat.items()}


def log_hparams(loggers: list[Logger], hparams: dict[str, bool | int | float | str]) -> None:
    """Each logger's record of the run's hyperparameters (call on rank 0).

    TensorBoard gets only the session record of this run, no experiment record and no metric values: from the
    sessions of all runs under a logdir, its HParams tab then builds one table of every hparam (those that differ
    across the runs first) and every scalar metric that any run has, whichever run it reads first."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            add_summary(logger.experiment, hparams_pb(hparams))
        else:
            logger.log_hyperparams(hparams)


def log_image(loggers: list[Logger], tag: str, grid: Tensor, step: int) -> None:
    """An image_grid (C, H, W in [0, 1]) to each logger that takes images."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            add_grid(logger.experiment, tag, grid, step)
        elif isinstance(logger, WandbLogger | MLFlowLogger):
            pixels = grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()  # H, W, C
            pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
            if isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[pixels], step=step)
            else:
                logger.experiment.log_image(logger.run_id, pixels, key=tag.replace("/", "_"), step=step)
