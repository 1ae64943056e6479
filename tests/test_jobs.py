"""The one reader of a job's status: running while a process holds its lock, then failed, finished or crashed."""

import json
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from autoencoders.cli import FAILURE_FILE
from autoencoders.jobs import CRASHED, FAILED, FINISHED, RUNNING, job_order, job_status
from autoencoders.rundirs import LOCK_FILE
from tests.helpers import ROOT


def trainer_stand_in(run_dir) -> subprocess.Popen:
    """A process that locks the run dir as rundirs.lock_run_dir does and then waits, as if it were training."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom autoencoders.rundirs import lock_run_dir\n"
        "lock_run_dir(Path(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_job_is_running_while_its_process_lives_and_crashed_once_it_is_killed(tmp_path):
    proc = trainer_stand_in(tmp_path)
    try:
        assert job_status(tmp_path).state == RUNNING
        assert str(job_status(tmp_path)) == f"running: process {proc.pid} is training in it"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    status = job_status(tmp_path)  # the OS released the lock; the process wrote neither metrics nor an error
    assert status.state == CRASHED and "without writing metrics.json or an error" in status.reason
    assert (tmp_path / LOCK_FILE).is_file()  # the lock file stays; only its lock decides


def test_a_failure_record_decides_over_older_metrics_and_finished_jobs_say_when(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    before = time.time()
    assert job_status(tmp_path).state == FINISHED and job_status(tmp_path).since >= before - 2
    (tmp_path / FAILURE_FILE).write_text(json.dumps({"error": "NaN loss at step 3"}))  # a later resume failed
    assert str(job_status(tmp_path)) == "failed: NaN loss at step 3"
    (tmp_path / FAILURE_FILE).write_text("{trunc")
    assert job_status(tmp_path).state == FAILED and "unreadable" in job_status(tmp_path).reason


def test_jobs_sort_by_their_number(tmp_path):
    names = ["10_a", "2_b", "x"]
    assert [p.name for p in sorted((tmp_path / n for n in names), key=job_order)] == ["x", "2_b", "10_a"]


@pytest.mark.parametrize("job", ["sweep", "transfer classifier", "transfer pretraining"])
@pytest.mark.parametrize("failed", [True, False], ids=["failed", "crashed"])
def test_a_slurm_job_that_did_not_finish_names_its_slurm_job_and_log(tmp_path, job, failed):
    """A job's .hydra/ as hydra/launcher=slurm leaves it, for each kind of sweep subdir: Hydra's default (a name from
    the overrides), the study's classifier (whose overrides name its encoder by `${seed}`, which only the job's own
    settings resolve) and the study's pretraining (pretrain/seed-0, two folders deep)."""
    overrides = {
        "sweep": ["model=ae"],
        "transfer classifier": ["experiment=transfer", "encoder_ckpt='pretrain/seed-${seed}/checkpoints/last.ckpt'"],
        "transfer pretraining": ["model=vae", "hydra.sweep.subdir=pretrain/seed-0"],
    }[job]
    sweep_dir = tmp_path / "study"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", *overrides], True)
    cfg.hydra.job.id, cfg.hydra.job.num = "19", 0  # as the launcher sets them in the job
    run_dir = sweep_dir / cfg.hydra.sweep.subdir
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), run_dir / ".hydra" / "hydra.yaml")
    with open_dict(cfg):
        del cfg.hydra
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    if failed:
        (run_dir / FAILURE_FILE).write_text(json.dumps({"error": "NaN loss at step 3"}))
    log = sweep_dir / ".submitit" / "19" / "19_0_log"
    assert str(job_status(run_dir)).endswith(f" (SLURM job 19, its log: {log}.out, stderr: {log}.err)")
