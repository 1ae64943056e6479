"""hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml): Hydra's submitit SLURM launcher with two changes.

- A job that ends without a result (cancelled, killed, out of memory, past its time limit) no longer ends the sweep
  with submitit's traceback while other jobs still run: every job is waited for, and the sweep's end
  (autoencoders.sweeps.FailureSummary) lists the ones that did not finish, each with its SLURM job id and log.
- SLURM's preemption signal (submitit's USR2, sent `signal_delay_s` before the time limit, or by
  `scancel --signal=USR2`) stops training or testing as SIGTERM does, between steps and with last.ckpt written
  (autoencoders.callbacks.Preemption); only then does submitit requeue the job, which resumes from last.ckpt. Left to
  itself, submitit requeues and exits at whatever line the signal lands on. Outside Lightning's fit and test (loading
  data, between the two, writing metrics), where submitit would ignore the SIGTERM, the job is requeued at once, even
  where the code the signal lands in turns the stop into another error (a pybind11 extension's import: ImportError).

A job of several tasks (DDP: tasks_per_node > 1) runs train.py in each; Lightning reads their ranks from SLURM. As
under Lightning's own DDP launcher, rank N logs to train_ddp_process_N.log and writes no config into the run dir.
"""

import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the others are slurm_<key> to submitit
        executor.update_parameters(**{key if key in shared else f"slurm_{key}": v for key, v in params.items()})
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # Hydra's hydra.sweep.mode, e.g. 775 for a group's sweep
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for number, overrides in zip(numbers, job_overrides, strict=True):
            log.info(f"\t#{number} : {' '.join(overrides)}")
        # the arguments of BaseSubmititLauncher.__call__, one list per argument
        arguments = [
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(numbers),
            list(numbers),
            [f"job_id_for_{n}" for n in numbers],
            [Singleton.get_state()] * len(numbers),
        ]
        jobs = executor.map_array(self, *arguments)
        array = jobs[0].job_id.split("_")[0]
        consoles = jobs[0].paths.folder.parent
        log.info(
            f"Submitted as SLURM job {array}: `squeue -j {array}` shows it; each job's console goes to {consoles}/"
        )
        return [self._outcome(job, overrides) for job, overrides in zip(jobs, job_overrides, strict=True)]

    @staticmethod
    def _outcome(job: Any, overrides: Sequence[str]) -> JobReturn:
        """The job's JobReturn; for a job that ended without one, no value, as train.py returns for a failed job."""
        from submitit.core.utils import UncompletedJobError

        try:
            return job.results()[0]
        except UncompletedJobError as e:
            log.error("SLURM job %s ended without a result: %s", job.job_id, " ".join(str(e).splitlines()[:2]))
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        """Run one task of a job on its node (see the module's docstring)."""
        import submitit

        from autoencoders import cli

        rank = submitit.JobEnvironment().global_rank
        if rank:  # another DDP process of the job, beside rank 0
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{rank}"]
        preemption = submitit.JobEnvironment._usr_sig()  # USR2, or $SUBMITIT_PREEMPT_SIGNAL
        requeue = signal.getsignal(preemption)  # submitit's: checkpoint this call, `scontrol requeue`, exit
        ignored = signal.getsignal(signal.SIGTERM)  # submitit's, which only logs it
        received: list[int] = []

        def on_preemption(number: int, frame: Any) -> None:
            received.append(number)
            name = signal.Signals(number).name
            if signal.getsignal(signal.SIGTERM) == ignored:  # Lightning handles SIGTERM only while it fits or tests
                log.warning("SLURM's preemption signal %s outside training and testing: requeueing the job", name)
                cli.stop(number)  # requeued below
            log.warning("SLURM's preemption signal %s: stopping as on SIGTERM", name)
            signal.raise_signal(signal.SIGTERM)

        signal.signal(preemption, on_preemption)
        try:
            return super().__call__(sweep_overrides, *args)
        except (SystemExit, cli.Stopped) as stopped:  # by the signal, in training (Preemption) or outside (cli.stop)
            if received and callable(requeue):
                requeue(received[0], None)  # exits, on rank 0
            if isinstance(stopped, cli.Stopped):  # another DDP rank: an exit code, not submitit's traceback
                raise SystemExit(128 + stopped.args[0]) from None
            raise
