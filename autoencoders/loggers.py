"""The loggers of conf/logger, and what train.py writes to each beyond Lightning's scalars: the run's
hyperparameters, and image grids to every logger that takes images (TensorBoard, wandb, MLflow; not CSV)."""

import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from autoencoders.errors import UserError
from autoencoders.files import atomic
from autoencoders.internals import add_summary
from autoencoders.pictures import add_grid

# targets that need an optional extra: (the module it imports, the extra that installs it)
OPTIONAL = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb"),
    "autoencoders.loggers.mlflow_logger": ("mlflow", "mlflow"),
}
NOT_HPARAMS = ("logger", "callbacks", "ckpt_path")
Hparams = dict[str, bool | int | float | str]
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


def tensorboard_writer(loggers: list[Logger]) -> SummaryWriter | None:
    """The SummaryWriter of the TensorBoard logger among `loggers`, if any."""
    return next((logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)), None)


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


def run_hparams(cfg: DictConfig, choices: Mapping[str, Any]) -> Hparams:
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


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` scalar that Lightning adds to every logging call: a step
    chart of no use, and else the first chart of the Scalars tab."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def log_hparams(loggers: list[Logger], hparams: Hparams, run_name: str, config_yaml: str) -> None:
    """Each logger's record of the run's hyperparameters (call on rank 0).

    TensorBoard gets the session record of this run, named by its run dir, its hparams.yaml in full, and the
    composed config in its Text tab. Which metric columns its HParams tab shows first comes from an experiment
    record (`write_experiment`), which train.py writes for a single run and the sweep's end for a sweep."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            add_summary(logger.experiment, hparams_pb(hparams, trial_id=run_name))
            logger.hparams.update(hparams)  # what Lightning writes to hparams.yaml
            logger.experiment.add_text("config", "".join(f"    {line}\n" for line in config_yaml.splitlines()))
        else:
            logger.log_hyperparams(hparams)


def log_outcome(loggers: list[Logger], metrics: Mapping[str, float], step: int, status: str) -> None:
    """At a run's end (rank 0): the selected checkpoint's validation and test metrics as `best/<split>/<name>`, and
    its SELECTED_AT, at the last step; in TensorBoard also the session's status (`success`, `failure`, or `unknown`
    for a run that a signal stopped, to be resumed)."""
    for logger in loggers:
        if metrics:
            logger.log_metrics({f"best/{k}": v for k, v in metrics.items()}, step=step)
        if isinstance(logger, TensorBoardLogger):
            status_pb = getattr(api_pb2, f"STATUS_{status.upper()}")
            end = plugin_data_pb2.SessionEndInfo(status=status_pb, end_time_secs=time.time())
            add_summary(logger.experiment, hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
            logger.experiment.flush()


SELECTED_AT = ("epoch", "step")  # of the selected checkpoint, logged beside its metrics as best/epoch, best/step


class RunMetrics(NamedTuple):
    """What a run shows in the HParams tab: the validation metric that chose its checkpoint (e.g. val/elbo) and the
    metrics of its metrics.json."""

    selection: str
    metrics: list[str]

    @property
    def test(self) -> str:
        """The test metric to show beside the selection one: the likelihood bound where there is one."""
        return next(
            (m for m in ("test/nll", "test/recon") if m in self.metrics), self.selection.replace("val/", "test/")
        )

    @property
    def tags(self) -> set[str]:
        """Its scalars among them: each metric as last logged (val/elbo) and as the selected checkpoint's (best/...)."""
        return {*self.metrics, *(f"best/{name}" for name in [*self.metrics, *SELECTED_AT])}


def metric_order(runs: list[RunMetrics]) -> list[str]:
    """The HParams tab's metric columns, in order: TensorBoard ticks the first five and colours parallel coordinates
    by the first. The selected checkpoint's selection and test metrics (`best/...`) come first where every run has
    them; then the other metrics every run has, the selected checkpoints' first, so that no run drops out of parallel
    coordinates (an AE beside a VAE: best/val/recon, best/test/recon, best/epoch, ...); then the rest."""
    tags = [run.tags for run in runs]
    every, union = (set.intersection(*tags), set.union(*tags)) if tags else (set(), set())
    key = [
        k for k in dict.fromkeys([f"best/{r.selection}" for r in runs] + [f"best/{r.test}" for r in runs]) if k in union
    ]
    every_first = sorted(every, key=lambda name: (not name.startswith("best/"), name))
    rest = sorted(union - every - set(key))
    return list(dict.fromkeys([k for k in key if k in every] + every_first + key + rest))


def hparams_summary(tag: str, **plugin_data: Any) -> Summary:
    """A summary of the hparams plugin's `tag` holding its HParamsPluginData (as tensorboard's summary_v2 writes
    hparams_pb; its own session-end and experiment writers need TensorFlow)."""
    summary_metadata = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**plugin_data))
    return Summary(value=[Summary.Value(tag=tag, metadata=summary_metadata, tensor=metadata.NULL_TENSOR)])


def write_experiment(writer: SummaryWriter, hparams: list[Hparams], metrics: list[str]) -> None:
    """TensorBoard's experiment record of these runs' hparams (those that differ flagged: its HParams tab ticks
    them first) and of `metrics`, in the order its HParams tab lists them."""
    types = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}
    infos = []
    for name in dict.fromkeys(k for run in hparams for k in run):
        values = [run[name] for run in hparams if name in run]  # as TensorBoard: runs without it do not differ
        kind = types.get(type(values[0]), api_pb2.DATA_TYPE_FLOAT64)
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=len({json.dumps(v) for v in values}) > 1))
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time())
    add_summary(writer, hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment))
    writer.flush()


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


SWEEP_RECORD = "events.out.tfevents.sweep"  # TensorBoard reads every file whose name holds "tfevents"


def record_sweep(sweep_dir: Path, jobs: list[Path]) -> None:
    """The experiment record of a sweep's finished jobs that logged to TensorBoard (their full hparams.yaml), in
    the sweep dir: `tensorboard --logdir <sweep dir>` opens its HParams tab on their columns (`metric_order`). An
    earlier end's record, of fewer jobs, is replaced: TensorBoard would read the first record it finds."""
    jobs = [job for job in jobs if (job / "hparams.yaml").is_file() and (job / "metrics.json").is_file()]
    if not jobs:
        return
    hparams = [OmegaConf.to_container(OmegaConf.load(job / "hparams.yaml")) for job in jobs]
    runs = [
        RunMetrics(get_class(OmegaConf.load(job / ".hydra" / "config.yaml").model._target_).selection[0],
                   list(json.loads((job / "metrics.json").read_text())))
        for job in jobs
    ]  # fmt: skip
    with atomic(sweep_dir / SWEEP_RECORD) as record, tempfile.TemporaryDirectory(dir=sweep_dir) as staging:
        with SummaryWriter(staging) as writer:  # it names its file itself: the one file in its own folder
            write_experiment(writer, hparams, metric_order(runs))
        next(Path(staging).iterdir()).rename(record)
