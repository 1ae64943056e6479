"""Reading back what train.py wrote: a sweep's job folders, a run's saved config and checkpoints, and the data config
rebuilt from them (with evaluate.py's data overrides), as evaluate.py scores them."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from autoencoders.cli import instantiated
from autoencoders.data import ImageDataModule
from autoencoders.errors import UserError
from autoencoders.jobs import CRASHED, FAILED, RUNNING, JobStatus, job_order, job_status

PRETRAIN_DIR = "pretrain"  # transfer.PRETRAIN_DIR: a transfer study's autoencoders, <sweep dir>/pretrain/seed-<seed>
NOT_SCORED = (FAILED, RUNNING)  # a running job's checkpoints are still changing; a failed one's error is its result


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    if not (sweep_dir / "multirun.yaml").is_file():
        raise UserError(
            f"sweep_dir={sweep_dir} is not a multirun sweep folder (it has no multirun.yaml). Pass the folder that "
            "`python train.py -m ...` created, e.g. outputs/multirun/<time>, or run_dir=<folder> for a single run."
        )
    pretrained = sweep_dir / PRETRAIN_DIR
    if (sweep_dir / ".transfer_jobs").is_dir() or pretrained.is_dir():  # transfer.JOBS_DIR: a transfer study
        jobs = sorted(p for p in pretrained.glob("*") if (p / ".hydra").is_dir()) if pretrained.is_dir() else []
        if not jobs:
            raise UserError(
                f"sweep_dir={sweep_dir} is a transfer study (train.py experiment=transfer) with no pretrained "
                f"autoencoder in {pretrained} yet. Its classifiers' test accuracy is in transfer.md; evaluate.py "
                "scores autoencoders: wait for the pretraining to finish."
            )
        return jobs
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    if not jobs:
        raise UserError(f"The sweep folder {sweep_dir} holds no job folders yet; wait for train.py -m to start them.")
    return sorted(jobs, key=job_order)


def scoring_status(run_dir: Path) -> JobStatus:
    """The one rule of run_dir= and sweep_dir= (and ckpt_path= in a run folder), by the run's status (jobs.job_status,
    the same words a sweep's report gives its jobs): a running run is refused, as its checkpoints still change; a
    failed one too, its error being its result; a crashed one (killed, out of memory) is scored from the checkpoints
    it left, and the console and the report say so; a finished one is scored."""
    status = job_status(run_dir)
    if status.state == RUNNING:
        raise UserError(
            f"{run_dir} is not scored: {status}, so its checkpoints are still changing. Score it once it has "
            "finished (the lock is released when train.py exits)."
        )
    if status.state == FAILED:
        raise UserError(
            f"{run_dir} is not scored: {status}. Fix the error and train it again, or score one of its checkpoints "
            f"on purpose with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}."
        )
    return status


def crashed_note(status: JobStatus, checkpoint: Path) -> str:
    """What a report and the console say of a run that `status` says crashed: '' for any other."""
    if status.state != CRASHED:
        return ""
    return f"{status} (its checkpoint {checkpoint.name}, from before it stopped, is scored)"


def run_config(run_dir: Path) -> DictConfig:
    """The config the run was trained with (<run>/.hydra/config.yaml, as Hydra saved it)."""
    path = run_dir / ".hydra" / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"run_dir={run_dir} is a file, not a folder. Pass run_dir=<the folder that train.py created>, e.g. "
            "outputs/runs/<time>_<overrides>, or score a lone checkpoint with ckpt_path=<file.ckpt>."
        )
    if not run_dir.is_dir():
        raise UserError(
            f"Run folder {run_dir} does not exist. Pass run_dir=<a folder that train.py created>, "
            "e.g. outputs/runs/<time>_<overrides>."
        )
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a train.py run folder: it has no .hydra/config.yaml to rebuild the model and data "
            "from. Pass the run's own folder, or score a lone checkpoint with ckpt_path=<file.ckpt> data=<dataset>."
        )
    try:
        config = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as e:
        raise UserError(f"{path} is not a readable config ({e}). Restore it from the run's original folder.") from None
    if not isinstance(config, DictConfig) or "data" not in config:
        raise UserError(f"{path} holds no data config, so it was not written by this project's train.py.")
    return config


def find_checkpoint(run_dir: Path, which: str) -> Path:
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt" if which == "best" else "last.ckpt"))
    if not found:
        other = "last" if which == "best" else "best"
        raise UserError(
            f"{run_dir} has no {which} checkpoint in checkpoints/ (training may have stopped early). "
            f"Try checkpoint={other}, or pass ckpt_path=<file.ckpt>."
        )
    return found[-1]  # top-1 checkpointing keeps one best; if several, the newest epoch


def data_config(run: DictConfig | None, cfg: DictConfig) -> DictConfig:
    """The run's own data config. An evaluation override replaces it when it is a whole data config (`data=<name>`),
    or changes keys in it (`+data.<key>=<value>`). Interpolations such as ${seed} resolve against the run's config,
    so the split is the one the run was trained on."""
    override = cfg.get("data")
    if run is None:
        if override is None or "_target_" not in override:
            raise UserError(
                f"ckpt_path={cfg.ckpt_path} is not inside a train.py run folder, so its data config is unknown. "
                "Name the data to score on, e.g. data=mnist_subset (see conf/data/)."
            )
        return override
    run.data.pop("num_workers", None)  # DataLoader workers, in runs from before data.device_cap_gb: no longer used
    if override is not None:
        whole = "_target_" in override
        run.data = OmegaConf.to_container(override) if whole else OmegaConf.merge(run.data, override)
    return run.data


def build_data(config: DictConfig) -> ImageDataModule:
    data = instantiated(config, "data")
    data.setup("test")
    return data
