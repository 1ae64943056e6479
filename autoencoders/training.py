"""What `python train.py` does once Hydra has composed the config: data -> model -> Trainer -> metrics.json."""

import json
import logging
import os
import re
import shlex
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from autoencoders import cli
from autoencoders.callbacks import BestCheckpoint, latest_val_metrics
from autoencoders.checkpoints import SafeCheckpointIO
from autoencoders.config import check_chosen_on_validation, check_settings
from autoencoders.console import metrics_table
from autoencoders.data import ImageDataModule
from autoencoders.errors import UserError
from autoencoders.files import remove, write_json
from autoencoders.internals import skip_inherited_batch_hooks
from autoencoders.likelihoods import for_data
from autoencoders.loggers import build_loggers, finish, log_hparams, log_outcome, record_sweep, run_hparams
from autoencoders.optim import run_values
from autoencoders.rundirs import (
    check_run_dir,
    finished,
    last_checkpoint,
    lock_run_dir,
    resume_checkpoint,
    resumes_in_place,
    unlock_run_dir,
)
from autoencoders.sweeps import check_launchable

log = logging.getLogger(__name__)

# Lightning's messages that no user of train.py can act on, silenced one by one (not by category):
# a deprecation inside Lightning's own pytree code; the logging-interval warning, which does not apply because epoch
# metrics and `train/*_step` are logged by global step, across epochs; outside SLURM, the hint to start with srun;
# and an advertisement for a cloud logger.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
if "SLURM_JOB_ID" not in os.environ:  # srun's hint only applies to a process that SLURM started (a login node has srun)
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud logging")
)


def check_config(cfg: DictConfig) -> None:
    """Reject bad values before anything is built or written: every setting against its range (config.py declares
    both, and Hydra has checked the types), then what no single range can say."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"Required setting(s) {', '.join(missing)} have no value (??? in the config). "
            f"Pass them on the command line, e.g. {missing[0]}=<value>."
        )
    check_settings(cfg)
    if cfg.objective is not None:  # what a sweeper selects on
        check_chosen_on_validation("objective", cfg.objective, "val/elbo")
    if cfg.trainer.get("max_epochs") == -1 and cfg.trainer.get("max_steps", -1) in (None, -1):
        raise UserError(
            "trainer.max_epochs=-1 with no trainer.max_steps would train forever. Set trainer.max_epochs=50, say, or "
            "a step limit such as trainer.max_steps=5000."
        )
    check_validation_runs(cfg.trainer)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={cfg.trainer.accelerator} (e.g. trainer=gpu), but PyTorch sees no CUDA GPU here. "
            "Use trainer=default (the best device available) or trainer=cpu."
        )
    precision = str(cfg.trainer.get("precision"))
    if precision in ("16", "16-mixed") and on_cpu(cfg.trainer.get("accelerator")):
        raise UserError(  # Lightning would quietly train in bf16-mixed instead
            f"trainer.precision={precision} (float16 mixed precision) needs a CUDA GPU, and this run trains on the "
            "CPU. Use trainer.precision=bf16-mixed (bfloat16, which CPUs support), or train on a GPU with trainer=gpu."
        )
    if cfg.compile and cfg.model.get("decoder_penalty") == "gradient":
        raise UserError(  # torch.compile's backward does not take the second derivative the penalty needs
            "compile=true cannot train model.decoder_penalty=gradient (RAE-GP): its penalty differentiates the "
            "decoder's gradient, which compiled nets do not support. Use compile=false."
        )
    if cfg.compile and cfg.model.get("leapfrog_steps"):
        raise UserError(  # as for RAE-GP: the leapfrog's gradient of -log p(x, z) is trained through
            f"compile=true cannot train model.leapfrog_steps={cfg.model.leapfrog_steps} (the Hamiltonian VAE): its "
            "bound differentiates the decoder's gradient in z, which compiled nets do not support. Use compile=false."
        )
    if cfg.model.get("consistency") and not cfg.get("augment"):
        raise UserError(
            f"model.consistency={cfg.model.consistency} compares M2's class guesses for an image and for a random "
            "transform of it, which needs augment=affine (its ranges: augment.shift, augment.degrees, augment.scale). "
            "Add augment=affine, or drop model.consistency."
        )
    if cfg.model.get("method") == "knn" and (cfg.get("augment") or OmegaConf.select(cfg, "callbacks.ema")):
        raise UserError(
            "model.method=knn stores the codes of the labelled images in one pass and takes no training step, so "
            "augment=affine (it would store codes of transformed images) and +callbacks=ema (no step would update the "
            "average) do not apply to it. Drop them for knn; in a transfer study, run knn in a study of its own."
        )
    if cfg.encoder_ckpt is not None and "num_classes" not in cfg.model:
        raise UserError(
            f"encoder_ckpt={cfg.encoder_ckpt} is read only by model=classifier, and this run trains "
            f"{cfg.model._target_.rsplit('.', 1)[-1]}. Drop encoder_ckpt, or add model=classifier to train a "
            "classifier on that encoder."
        )


def check_validation_runs(trainer: DictConfig) -> None:
    """Refuse a schedule that ends before its first validation (then no checkpoint could be chosen, and there are no
    val metrics): integer step or epoch counts only; a fractional val_check_interval, a share of an epoch, is fine.
    The values are in their ranges (config.OPEN_GROUP_RULES)."""
    if trainer.get("fast_dev_run") or trainer.get("limit_val_batches") == 0:  # validates once / never on purpose
        return
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    interval = trainer.get("val_check_interval")
    every = trainer.get("check_val_every_n_epoch", 1)  # Lightning's default: after every epoch
    if every is None and isinstance(interval, int) and max_steps is not None and 0 < max_steps < interval:
        raise UserError(
            f"trainer.max_steps={max_steps} ends before the first validation at trainer.val_check_interval={interval} "
            "(with trainer.check_val_every_n_epoch=null, validation runs every val_check_interval steps): no "
            "checkpoint could be chosen. Raise trainer.max_steps or lower trainer.val_check_interval."
        )
    if every is not None and max_epochs is not None and 0 < max_epochs < every:
        raise UserError(
            f"trainer.max_epochs={max_epochs} ends before the first validation at trainer.check_val_every_n_epoch="
            f"{every}: no checkpoint could be chosen. Raise trainer.max_epochs or lower "
            "trainer.check_val_every_n_epoch."
        )


def on_cpu(accelerator: str | None) -> bool:
    """Whether a Trainer with this `trainer.accelerator` trains on the CPU (auto: when no GPU is available)."""
    if accelerator in (None, "auto"):
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return accelerator == "cpu"


def select_on_whole_val(cfg: DictConfig) -> None:
    """selection=full_val chooses the checkpoint on the whole val split: the data keep every val image."""
    if cfg.get("selection") == "full_val":
        cfg.data.val_labels_per_class = None


def build(cfg: DictConfig) -> tuple[ImageDataModule, L.LightningModule]:
    """The set-up data module, and the model built for it from `cfg` with its optimizer and schedule.

    Every model gets the data's image shape. One whose config declares num_classes (the classifier) gets that too; an
    autoencoder whose likelihood is null gets the data's (bernoulli on binarised data); and a null latent_dim with no
    encoder_ckpt to take it from (a classifier's) is the top-level latent_dim."""
    select_on_whole_val(cfg)
    augment = cli.instantiated(cfg.augment, "augment") if cfg.get("augment") else None  # augment=none: {}
    datamodule = cli.instantiated(cfg.data, "data", augment=augment)
    datamodule.setup("fit")
    needs = {"num_classes": datamodule.num_classes} if "num_classes" in cfg.model else {}
    if "likelihood" in cfg.model:
        needs["likelihood"] = for_data(cfg.model.likelihood, datamodule.hparams.binarize)
    # A classifier with an encoder_ckpt takes the checkpoint's code size, unless latent_dim is set on the command line:
    # then that value is checked against the checkpoint's, so a run dir named latent_dim-8 never trains with 32.
    task = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    given = any(o.lstrip("+").startswith("latent_dim=") for o in task)
    if cfg.model.get("latent_dim", 0) is None and (given or not cfg.model.get("encoder_ckpt")):
        needs["latent_dim"] = cfg.latent_dim
    optimization = {
        "optimizer": instantiate(cfg.optimizer),
        "scheduler": instantiate(cfg.get("scheduler"), _convert_="all"),
    }
    model = cli.instantiated(
        cfg.model, "model", image_shape=datamodule.image_shape, **needs, **optimization, _convert_="all"
    )
    labels = datamodule.hparams.labels_per_class
    if labels is not None and "num_classes" not in cfg.model and not getattr(model, "semi_supervised", False):
        log.warning(  # an autoencoder uses no labels: the subset is only fewer images, which a user may not expect
            "%s trains on %d labelled images (data.labels_per_class=%d) of the %d training images; drop "
            "data.labels_per_class to train on all",
            *(type(model).__name__, len(datamodule.train_set), labels, len(datamodule.unlabelled_set)),
        )
    return datamodule, model


def build_callbacks(configs: DictConfig, selection: tuple[str, str]) -> list[L.Callback]:
    """The callbacks of the `callbacks` node, in order, but a weight average (+callbacks=ema) last: it swaps the average
    in when validation starts and out when it ends, so the other callbacks' validation hooks (probe, pictures, the
    checkpoints' choice) all see the average. A null `monitor` and `mode` are the model's `selection`."""
    monitor, mode = selection
    callbacks = [
        instantiate(config, **run_values(config, monitor=monitor, mode=mode))
        for config in configs.values()
        if config is not None  # callbacks.<name>=null drops one
    ]
    return sorted(callbacks, key=lambda callback: isinstance(callback, WeightAveraging))  # stable: the rest in order


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, float]:
    """Train, test and write metrics.json; `extra_callbacks` (e.g. a benchmark's timer) join the configured ones."""
    check_config(cfg)
    logging.getLogger("lightning").handlers.clear()  # Hydra's handlers already print and log to <run>/train.log
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if finished(run_dir, hydra.mode):
        log.info("Job %s finished in an earlier run of this sweep: skipped, its files left as they were", run_dir.name)
        return json.loads((run_dir / "metrics.json").read_text())
    if hydra.mode == RunMode.MULTIRUN and cfg.ckpt_path is None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))  # set by SLURM in a requeued job
        how = (
            f"was requeued by SLURM (job {hydra.job.id}, restart {restarts})"
            if restarts
            else "stopped in an earlier run of this sweep"
        )
        last = last_checkpoint(run_dir)
        if last.is_file():
            log.info("Job %s %s: resuming it from %s", run_dir.name, how, last)
            cfg.ckpt_path = "last"
        elif restarts:
            log.info("Job %s %s before its first checkpoint: training it from the start", run_dir.name, how)
    check_run_dir(run_dir, cfg.ckpt_path)
    lock_run_dir(run_dir)  # before anything in it is written
    try:
        return _train_in(run_dir, cfg, extra_callbacks or [])
    finally:
        unlock_run_dir(run_dir)


def _train_in(run_dir: Path, cfg: DictConfig, extra_callbacks: list[L.Callback]) -> dict[str, float]:
    remove(run_dir / cli.FAILURE_FILE)  # an earlier attempt's: this one decides the job's status
    L.seed_everything(cfg.seed, workers=True)

    datamodule, model = build(cfg)
    ckpt_path = resume_checkpoint(cfg.ckpt_path, run_dir, model)
    if resumes_in_place(cfg.ckpt_path, run_dir):  # its checkpoints dir holds the run's own checkpoints, as it should
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(run_dir))}.* exists and is not")
    if cfg.compile:
        for net in model.children():  # in place, so parameter names and checkpoints stay as without
            net.compile()

    loggers = build_loggers(cfg.get("logger"), run_dir.name)
    callbacks = build_callbacks(cfg.callbacks, model.selection) + extra_callbacks
    if cfg.selection == "none":  # a fixed schedule: no checkpoint is chosen, the last weights are tested
        callbacks = [c for c in callbacks if not isinstance(c, BestCheckpoint)]
    plugins: list = [SafeCheckpointIO()]
    if SLURMEnvironment.detect():  # ranks from SLURM; no auto-requeue, whose SIGUSR1 checkpoint is mid-epoch:
        # SLURM's preemption stops through Preemption, and hydra/launcher=slurm requeues
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer: L.Trainer = cli.instantiated(cfg.trainer, "trainer", logger=loggers, callbacks=callbacks, plugins=plugins)
    check_launchable(trainer)
    for callback in trainer.callbacks:  # Lightning's own too
        skip_inherited_batch_hooks(callback)
    hparams = run_hparams(cfg, HydraConfig.get().runtime.choices)
    if trainer.is_global_zero:
        command = shlex.join(["python", "train.py", *HydraConfig.get().overrides.task])  # a sweep's job: its own
        log_hparams(loggers, hparams, run_dir.name, command, OmegaConf.to_yaml(cfg, resolve=True))

    cli.training_started.append(run_dir)  # from here on, the run dir stays whatever happens
    try:
        metrics, test_ckpt, selected_at = _fit_and_test(trainer, model, datamodule, ckpt_path, callbacks)
    except BaseException as error:
        if trainer.is_global_zero:  # TensorBoard's HParams tab shows each run's status; stopped by a signal: unknown
            stopped = isinstance(error, (SystemExit, cli.Stopped))
            log_outcome(loggers, {}, trainer.global_step, "unknown" if stopped else "failure")
        raise
    if trainer.is_global_zero:
        log_outcome(loggers, metrics | selected_at, trainer.global_step, "success")
        finish(loggers)
        write_json(run_dir / "metrics.json", metrics)
        if HydraConfig.get().mode == RunMode.RUN:  # TensorBoard's HParams columns; a sweep's end writes the sweep's
            record_sweep(run_dir, [run_dir])
        chosen = Path(test_ckpt).name if test_ckpt else "the final weights"
        log.info(
            "Run dir: %s\nMetrics of %s (nats per image unless noted), in metrics.json:\n%s",
            *(run_dir, chosen, metrics_table(dict(sorted(metrics.items())))),
        )
    return metrics


def _fit_and_test(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None,
    callbacks: list[L.Callback],
) -> tuple[dict[str, float], str | None, dict[str, int]]:  # fmt: skip
    """Train, then test the best checkpoint by validation; without one (fast_dev_run, or no best_checkpoint
    callback), the weights as they are, with the validation metrics of the last epoch. Returns both splits' metrics,
    the checkpoint tested (None: the final weights) and the epoch and step it was saved at."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as stop:  # Lightning's sys.exit(1) after Ctrl-C, once Preemption has said what was kept
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    best = next((c for c in callbacks if isinstance(c, BestCheckpoint)), None)
    test_ckpt = (best.best_model_path if best else "") or None
    val = best.val_metrics if test_ckpt else latest_val_metrics(trainer)
    test = trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False, weights_only=True)
    selected_at = best.selected_at if test_ckpt else {"epoch": trainer.current_epoch - 1, "step": trainer.global_step}
    return {**val, **test[0]}, test_ckpt, selected_at
