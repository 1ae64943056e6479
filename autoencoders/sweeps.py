"""Sweeps under Hydra: the value a job returns to a sweeper, the end-of-sweep summary, launchers, parallel jobs'
threads.

Imported before torch (Hydra instantiates the callbacks here at start-up), so torch is imported only inside functions.
"""

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from autoencoders.cli import CommandCallback, ending_the_command
from autoencoders.errors import UserError
from autoencoders.jobs import FINISHED, job_order, job_status
from autoencoders.rundirs import check_room

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

STARTED_FILE = ".sweep_started"  # in the sweep dir: failures older than it belong to an earlier invocation


def objective(metrics: dict[str, float], cfg: DictConfig) -> float:
    """The metric that train.py returns to a sweeper: `cfg.objective`, or if null the model's selection metric."""
    name = cfg.objective or get_class(cfg.model._target_).selection[0]
    if name not in metrics:
        raise UserError(
            f"objective={name} is not among this run's metrics ({', '.join(sorted(metrics))}); its results are saved, "
            "but a sweeper gets no value. Set objective to one of them (hparams_search=vae_optuna needs a VAE model, "
            "whose metrics include val/elbo)."
        )
    return metrics[name]


def check_sweep_dir(sweep_dir: Path) -> None:
    """Refuse a sweep dir that holds a run, or files of the user's: only an empty folder or an earlier sweep's dir
    (where a sweep run again skips its finished jobs) takes a sweep."""
    if not sweep_dir.exists():
        return
    if not sweep_dir.is_dir():
        raise UserError(f"hydra.sweep.dir={sweep_dir} is a file, not a folder. Choose a new or empty folder.")
    run = next((sweep_dir / name for name in (".hydra", "checkpoints", "metrics.json") if (sweep_dir / name).exists()),
               None)  # fmt: skip
    if run is not None:
        raise UserError(
            f"hydra.sweep.dir={sweep_dir} holds a run ({run.name}), and a sweep must not write into it. Choose a new "
            "folder, or leave hydra.sweep.dir at its default (a new timestamped folder). Nothing was changed."
        )
    entries = sorted(os.listdir(sweep_dir))
    if entries and STARTED_FILE not in entries:
        raise UserError(
            f"hydra.sweep.dir={sweep_dir} holds files that are not a sweep's ({entries[0]}, ...), and a sweep must "
            "not write among them. Choose a new or empty folder, or leave hydra.sweep.dir at its default (a new "
            "timestamped folder). Nothing was changed."
        )


class FailureSummary(CommandCallback):
    """Hydra callback: when a sweep ends, say which jobs it skipped as finished earlier, list this invocation's failed
    jobs with their reasons, and exit 1 if any failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        with ending_the_command(f"Starting the sweep in {sweep_dir}", sweep_dir):
            check_sweep_dir(sweep_dir)
            check_room(sweep_dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)  # before the sweeper starts: Optuna keeps its study there
            (sweep_dir / STARTED_FILE).touch()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started = (sweep_dir / STARTED_FILE).stat().st_mtime
        statuses = {p.parent: job_status(p.parent) for p in sweep_dir.rglob(".hydra") if p.is_dir()}
        done = sorted(job.name for job, status in statuses.items() if status.state == FINISHED)
        skipped = sorted(job.name for job, s in statuses.items() if s.state == FINISHED and s.since < started)
        if skipped:
            print(
                f"sweep {sweep_dir}: {len(skipped)} job(s) had finished in an earlier invocation of the sweep, their "
                f"files left as they were ({', '.join(skipped)}); {len(done) - len(skipped)} job(s) ran to the end "
                "now."
            )
        else:  # also what a launcher that keeps the jobs' output to itself (submitit) leaves the console
            print(
                f"sweep {sweep_dir}: {len(done)} job(s) ran to the end: {', '.join(done)}; each has its metrics.json "
                "and train.log."
            )
        from autoencoders.checkpoints import signals_deferred
        from autoencoders.loggers import record_sweep  # imports torch: only once the jobs are done

        finished = sorted((job for job in statuses if statuses[job].state == FINISHED), key=job_order)
        with ending_the_command("The sweep's TensorBoard record", sweep_dir), signals_deferred():
            record_sweep(sweep_dir, finished)  # Ctrl-C or SIGTERM stops the sweep once that record is whole
        # this invocation's jobs that did not finish: a failure recorded now, or a job started now that went silent
        unfinished = [
            (job.resolve().relative_to(sweep_dir.resolve()), status)
            for job, status in sorted(statuses.items(), key=lambda item: job_order(item[0]))
            if status.state != FINISHED and max(status.since, (job / ".hydra").stat().st_mtime) >= started
        ]
        if not unfinished:
            return
        print(
            f"error: {len(unfinished)} job(s) of the sweep in {sweep_dir} did not finish (each job's train.log has the "
            "details); the other jobs ran to the end and their results are in place:\n"
            + "\n".join(f"  {job}: {status}" for job, status in unfinished),
            file=sys.stderr,
        )
        sys.exit(1)


class LauncherCheck(CommandCallback):
    """Hydra callback: refuse a SLURM sweep on a machine without SLURM before any job is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = OmegaConf.select(config, "hydra.launcher._target_") or ""
        if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
            raise UserError(
                "hydra/launcher=slurm submits each job with SLURM's sbatch, which is not installed on this machine. "
                "Run the sweep from a SLURM login node, or here with hydra/launcher=joblib (parallel processes) or "
                "the default launcher (one job after another)."
            )


class ThreadSplit(CommandCallback):
    """Hydra callback: under a launcher that runs several jobs at once on a machine, each job's torch gets its share
    of the cores instead of every job using every core: cores // n_jobs threads under joblib, so that jobs x threads
    <= cores; under submitit (local, or SLURM, whose nodes may not confine a job to its CPUs),
    `hydra.launcher.cpus_per_task` threads (null: 1)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher", default={})
        n_jobs = launcher.get("n_jobs")
        submitit = "submitit_folder" in launcher  # hydra/launcher=slurm, submitit_local or submitit_slurm
        if n_jobs is None and not submitit:
            return
        import joblib
        import torch

        cores = joblib.cpu_count()  # respects CPU affinity and cgroup quotas
        if submitit:
            threads = launcher.get("cpus_per_task") or 1
        else:
            parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but 1
            threads = max(1, cores // parallel)
        torch.set_num_threads(threads)
        log.info(
            "%d cores, jobs run in parallel: torch threads: %d in this job (process %d)",
            *(cores, torch.get_num_threads(), os.getpid()),
        )


def check_launchable(trainer: "L.Trainer") -> None:
    """Refuse DDP that would start its processes by re-running train.py inside a sweep.

    Outside a cluster, Lightning starts ranks 1..N-1 by running `python train.py <same arguments>`; in a sweep those
    arguments start the whole sweep again. Under SLURM the cluster starts every process itself, which works.
    """
    if HydraConfig.get().mode != RunMode.MULTIRUN or trainer.world_size == 1:
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        return
    raise UserError(
        f"A {trainer.world_size}-process DDP run cannot start inside a sweep (-m) on this machine: Lightning "
        "starts the extra processes by re-running `python train.py` with the sweep's arguments, which would start the "
        "whole sweep again in each of them. Run each configuration as a single run (without -m), or sweep on SLURM "
        "(hydra/launcher=slurm with hydra.launcher.tasks_per_node equal to trainer.devices), where SLURM starts the "
        "processes."
    )
