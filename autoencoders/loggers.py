"""The loggers of conf/logger, and what train.py writes to each beyond Lightning's scalars: the run's
hyperparameters, and image grids to every logger that takes images (TensorBoard, wandb, MLflow; not CSV)."""

import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from autoencoders.errors import UserError
from autoencoders.files import atomic
from autoencoders.internals import add_summary
from autoencoders.jobs import job_order
from autoencoders.metrics import METRICS, metric_key
from autoencoders.pictures import add_grid, add_png

# targets that need an optional extra: (the module it imports, the extra that installs it)
OPTIONAL = {
    "autoencoders.loggers.wandb_logger": ("wandb", "wandb"),
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


def finish(loggers: list[Logger]) -> None:
    """Flush each logger and close its run (call on rank 0), so that the next job of a sweep in this process starts
    its own run: wandb would otherwise go on logging into this one."""
    for logger in loggers:
        logger.finalize("success")  # a writer's queue is not always written out at interpreter exit
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """Lightning's WandbLogger, without the `anonymous` setting it always hands to wandb.init: wandb has ignored it
    since 0.23 and warns that it has no effect (wandb#10909), a warning its user could do nothing about."""
    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous") is None:  # not asked for (logger.wandb.anonymous: older wandb's setting)
        del logger._wandb_init["anonymous"]
    return logger


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


# TensorBoard orders its charts by the tag's first part: the one-point scalars of a run's outcome (the selected
# checkpoint's metrics, evaluate.py's) go under a name that sorts after train/ and val/, so the curves come first.
OUTCOME = "verdict"
EVAL_RUN = "eval"  # evaluate.py's scalars of a run: in <run>/eval, TensorBoard's run <run>/eval, the session's group


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` scalar that Lightning adds to every logging call (a step
    chart of no use) and without the test split's one-point scalars, which `log_outcome` writes as verdict/test/*."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch" and not k.startswith("test/")}, step)


def session_value(value: bool | int | float | str) -> bool | float | str:
    """An hparam as the HParams tab shows it: it prints every number to 5 significant digits (2 as 2.0000), so an
    integer is written as its text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def log_hparams(loggers: list[Logger], hparams: Hparams, run_name: str, command: str, config_yaml: str) -> None:
    """Each logger's record of the run's hyperparameters (call on rank 0).

    TensorBoard gets the session record of this run, named by its run dir, its hparams.yaml in full, and in its Text
    tab `command` (that trains this run alone, a sweep's job too) and `config_yaml`. Which columns its HParams tab
    shows first comes from an experiment record (`record_sweep`), which train.py writes at a single run's end and at
    a sweep's end."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            session = {name: session_value(value) for name, value in hparams.items()}
            add_summary(logger.experiment, hparams_pb(session, trial_id=run_name))
            logger.hparams.update(hparams)  # what Lightning writes to hparams.yaml
            text = "".join(f"    {line}\n" for line in config_yaml.splitlines())
            logger.experiment.add_text("config", f"Command:\n\n    {command}\n\nConfig:\n\n{text}")
        else:
            logger.log_hyperparams(hparams)


def log_outcome(loggers: list[Logger], metrics: Mapping[str, float], step: int, status: str) -> None:
    """At a run's end (rank 0): the selected checkpoint's validation and test metrics as `verdict/<split>/<name>`,
    and the epoch and step it was saved at, at the last step; in TensorBoard also the session's status (`success`,
    `failure`, or `unknown` for a run that a signal stopped, to be resumed)."""
    for logger in loggers:
        if metrics:
            logger.log_metrics({f"{OUTCOME}/{k}": v for k, v in metrics.items()}, step=step)
        if isinstance(logger, TensorBoardLogger):
            status_pb = getattr(api_pb2, f"STATUS_{status.upper()}")
            end = plugin_data_pb2.SessionEndInfo(status=status_pb, end_time_secs=time.time())
            add_summary(logger.experiment, hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
            logger.experiment.flush()


Metric = tuple[str, str]  # an HParams column: (scalar tag, group: the run under the session's run dir that logs it)


class RunMetrics(NamedTuple):
    """What a run shows in the HParams tab: the validation metric that chose its checkpoint (e.g. val/elbo), the
    metrics of its metrics.json, and evaluate.py's latest of each metric (e.g. test/fid_prior: its value)."""

    selection: str
    metrics: list[str]
    evaluation: Mapping[str, float] = {}

    @property
    def test(self) -> str:
        """The test metric to show beside the selection one: the likelihood bound where there is one."""
        return next(
            (m for m in ("test/nll", "test/recon") if m in self.metrics), self.selection.replace("val/", "test/")
        )


def metric_order(runs: list[RunMetrics]) -> list[Metric]:
    """The HParams tab's metric columns, in order: TensorBoard ticks the first five and colours parallel coordinates
    by the first. The selected checkpoints' selection metrics, then their test values (those every run has first, so
    that no run drops out of parallel coordinates: an AE beside a VAE, val/recon before val/elbo); then evaluate.py's
    metrics, test split first, FID first, any whose value is the same in every run (the floor, k) last."""
    every = set.intersection(*(set(run.metrics) for run in runs)) if runs else set()
    chosen = list(dict.fromkeys([r.selection for r in runs] + [r.test for r in runs]))
    chosen = [name for name in chosen if any(name in run.metrics for run in runs)]
    evaluated = {name: {run.evaluation.get(name) for run in runs} for run in runs for name in run.evaluation}

    def rank(name: str) -> tuple:
        try:
            key = metric_key(name)
        except KeyError:  # a metric METRICS does not list yet
            key = None
        same = len(runs) > 1 and len(evaluated[name] - {None}) == 1  # among the runs that have it
        position = list(METRICS).index(key) if key else len(METRICS)
        return same, not name.startswith("test/"), key != "fid_{sampler}", position, name

    return [(f"{OUTCOME}/{name}", "") for name in sorted(chosen, key=lambda name: name not in every)] + [
        (f"{OUTCOME}/{name}", EVAL_RUN) for name in sorted(evaluated, key=rank)
    ]


def hparams_summary(tag: str, **plugin_data: Any) -> Summary:
    """A summary of the hparams plugin's `tag` holding its HParamsPluginData (as tensorboard's summary_v2 writes
    hparams_pb; its own session-end and experiment writers need TensorFlow)."""
    summary_metadata = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**plugin_data))
    return Summary(value=[Summary.Value(tag=tag, metadata=summary_metadata, tensor=metadata.NULL_TENSOR)])


def write_experiment(writer: SummaryWriter, hparams: list[Hparams], metrics: list[Metric]) -> None:
    """TensorBoard's experiment record of these runs' hparams and `metrics`, in the order its HParams tab lists them.

    Its HParams tab ticks the first five hparams, those flagged as differing first, whether or not they differ: so
    where some differ, only those are listed (the others are in each run's Text tab and hparams.yaml)."""
    types = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}
    infos = []
    for name in dict.fromkeys(k for run in hparams for k in run):
        values = list({json.dumps(v): v for run in hparams if name in run for v in [session_value(run[name])]}.values())
        kinds = {type(v) for v in values}  # as TensorBoard: runs without it do not differ
        kind = types.get(kinds.pop(), api_pb2.DATA_TYPE_STRING) if len(kinds) == 1 else api_pb2.DATA_TYPE_STRING
        info = api_pb2.HParamInfo(name=name, type=kind, differs=len(values) > 1)
        if kind != api_pb2.DATA_TYPE_FLOAT64:  # the values its filter offers, as TensorBoard lists them
            info.domain_discrete.extend(v if kind == api_pb2.DATA_TYPE_BOOL else str(v) for v in values)
        infos.append(info)
    metric_infos = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=tag, group=group),
            display_name=f"{group}: {tag.removeprefix(OUTCOME + '/')}" if group else tag.removeprefix(OUTCOME + "/"),
        )
        for tag, group in metrics
    ]
    experiment = api_pb2.Experiment(
        hparam_infos=[info for info in infos if info.differs] or infos, metric_infos=metric_infos,
        time_created_secs=time.time(),
    )  # fmt: skip
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
EVAL_RECORD = "events.out.tfevents.evaluations"


def record_sweep(sweep_dir: Path, jobs: list[Path]) -> None:
    """The experiment record of a sweep's finished jobs that logged to TensorBoard (their full hparams.yaml, their
    metrics and evaluate.py's), in the sweep dir (a single run's: `record_sweep(run_dir, [run_dir])`):
    `tensorboard --logdir <sweep dir>` opens its HParams tab on their columns (`metric_order`). An earlier record, of
    fewer jobs or metrics, is replaced: TensorBoard would read the first record it finds."""
    jobs = [job for job in jobs if (job / "hparams.yaml").is_file() and (job / "metrics.json").is_file()]
    if not jobs:
        return
    hparams = [OmegaConf.to_container(OmegaConf.load(job / "hparams.yaml")) for job in jobs]
    runs = [
        RunMetrics(get_class(OmegaConf.load(job / ".hydra" / "config.yaml").model._target_).selection[0],
                   list(json.loads((job / "metrics.json").read_text())), evaluated(job / "eval"))
        for job in jobs
    ]  # fmt: skip
    write_events(sweep_dir / SWEEP_RECORD, lambda writer: write_experiment(writer, hparams, metric_order(runs)))


def latest_evaluations(eval_dir: Path) -> dict[str, Path]:
    """A run's latest evaluation of each split (<run>/eval/<name>/, whole: never one metric of one evaluation beside
    another's), not the hidden folders of one being written or replaced."""
    latest = {}
    for folder in sorted((p.parent for p in eval_dir.glob("[!.]*/metrics.json")), key=lambda p: p.stat().st_mtime):
        latest[OmegaConf.load(folder / "config.yaml").split] = folder
    return latest


def evaluated(eval_dir: Path) -> dict[str, float]:
    """The metrics of a run's latest evaluation of each split (`<split>/<name>`)."""
    return {
        k: v
        for folder in latest_evaluations(eval_dir).values()
        for k, v in json.loads((folder / "metrics.json").read_text()).items()
    }


def record_evaluations(eval_dir: Path) -> None:
    """The metrics and pictures of a run's latest evaluation of each split (`latest_evaluations`), as one-point
    scalars and images `verdict/<split>/<name>` in <run>/eval: TensorBoard shows them as one run, <run>/eval, whose
    scalars the run's HParams session shows (group `eval`)."""
    pictures = {}
    for split, folder in latest_evaluations(eval_dir).items():
        pictures |= {f"{OUTCOME}/{split}/{png.stem}": png for png in sorted(folder.glob("*.png"))}

    def write(writer: SummaryWriter) -> None:
        for name, value in evaluated(eval_dir).items():
            writer.add_scalar(f"{OUTCOME}/{name}", value, 0)
        for tag, png in pictures.items():
            with Image.open(png) as image:
                shape = (len(image.getbands()), image.height, image.width)
            add_png(writer, tag, png.read_bytes(), shape)

    write_events(eval_dir / EVAL_RECORD, write)


def jobs_under(folder: Path) -> list[Path]:
    """The runs in `folder` (itself, for a single run), in job order: a sweep's jobs, a transfer study's pretraining
    and classifier jobs."""
    return sorted((path.parent for path in folder.rglob(".hydra") if path.is_dir()), key=job_order)


def record_evaluated_run(run_dir: Path) -> None:
    """After evaluate.py scored a run (`record_evaluations`): the experiment record that lists its metrics, the run's
    own (a single run's) or that of the sweep or study it is a job of."""
    run_dir = run_dir.resolve()
    for folder in (run_dir, *run_dir.parents):
        if (folder / SWEEP_RECORD).is_file():
            record_sweep(folder, jobs_under(folder))
            return


def write_events(path: Path, write: Callable[[SummaryWriter], Any]) -> None:
    """An event file named `path`, written whole by `write(writer)`, or not at all."""
    with atomic(path) as record, tempfile.TemporaryDirectory(dir=path.parent) as staging:
        with SummaryWriter(staging) as writer:  # it names its file itself: the one file in its own folder
            write(writer)
        next(Path(staging).iterdir()).rename(record)
