"""A job's status, read from what its run dir holds: the one reader behind evaluate.py's sweep report, the transfer
study's tables and the end-of-sweep summary. Imported before torch.

- running: a process holds the run dir's lock (rundirs.lock_run_dir), so it is training there now;
- failed: it wrote failure.json (cli.failed_job_record) with its error;
- finished: it wrote metrics.json after testing;
- crashed: none of these, so it stopped without a word (killed, out of memory, its node gone).

A failed or crashed job that hydra/launcher=slurm ran also names its SLURM job and that job's log.
"""

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from autoencoders.cli import FAILURE_FILE
from autoencoders.rundirs import LOCK_FILE

FINISHED, FAILED, RUNNING, CRASHED = "finished", "failed", "running", "crashed"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class JobStatus:
    state: str  # FINISHED, FAILED, RUNNING or CRASHED
    reason: str = ""  # why, for every state but FINISHED
    since: float = 0.0  # when the file that decided the state was written (time.time()); 0 for RUNNING and CRASHED

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}" if self.reason else self.state


def job_status(run_dir: Path) -> JobStatus:
    holder = lock_holder(run_dir)
    if holder is not None:
        return JobStatus(RUNNING, f"process {holder} is training in it")
    failure, metrics = run_dir / FAILURE_FILE, run_dir / METRICS_FILE
    if failure.is_file():  # a rerun removes its earlier failure record when it starts, so this one is the latest
        try:
            error = json.loads(failure.read_text())["error"]
        except (OSError, ValueError, KeyError, TypeError):
            error = f"its {FAILURE_FILE} is unreadable; train.log has the error"
        return JobStatus(FAILED, error + slurm_job(run_dir), failure.stat().st_mtime)
    if metrics.is_file():
        return JobStatus(FINISHED, since=metrics.stat().st_mtime)
    return JobStatus(
        CRASHED,
        f"it stopped without writing {METRICS_FILE} or an error (killed, out of memory, or its machine went down); "
        "its train.log ends where it stopped" + slurm_job(run_dir),
    )


def slurm_job(run_dir: Path) -> str:
    """' (SLURM job <id>, its log: <path>, stderr: <path>)' for a job that submitit ran on SLURM, else ''."""
    try:  # the job's config as it saw it: its hydra settings may refer to its other settings (a subdir to ${seed})
        job = OmegaConf.merge(*(OmegaConf.load(run_dir / ".hydra" / f"{name}.yaml") for name in ("config", "hydra")))
        hydra = job.hydra
        if not str(hydra.launcher.get("_target_", "")).endswith("SlurmLauncher"):
            return ""
        sweep_dir = run_dir.parents[len(Path(hydra.sweep.subdir).parts) - 1]  # the job dir is <sweep dir>/<subdir>
        hydra.sweep.dir = str(sweep_dir)  # as the job saw it, perhaps relative to another working dir
        log = Path(hydra.launcher.submitit_folder.replace("%j", hydra.job.id)) / f"{hydra.job.id}_0_log"
    except (OSError, OmegaConfBaseException):  # no record of the job's settings, or ones this process cannot resolve
        return ""
    return f" (SLURM job {hydra.job.id}, its log: {log}.out, stderr: {log}.err)"


def lock_holder(run_dir: Path) -> str | None:
    """The PID of the process that holds the run dir's lock, or None if no process does."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: nothing ever trained here under a lock
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # also releases the shared lock, if taken
    return None


def job_order(run_dir: Path) -> tuple[int, str]:
    """Hydra names a sweep's jobs <num>_<overrides>: sort 2_ before 10_."""
    number = run_dir.name.split("_")[0]
    return (int(number) if number.isdigit() else -1, run_dir.name)
