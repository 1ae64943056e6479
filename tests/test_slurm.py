"""train.py on a real single-node SLURM cluster with accounting (scripts/slurm_cluster.sh: Debian's slurm-wlm,
slurmdbd, MariaDB and munge, started by root in a temporary folder), and beside SLURM's commands: `pytest -m slurm`.
Skipped where they are not installed."""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import (
    ROOT,
    STOPPED_IMPORT_PATH,
    STOPPED_IMPORT_WAITING,
    STOPPED_IMPORTS,
    TINY,
    metrics,
    run_train,
)

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        any(shutil.which(p) is None for p in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch"))
        or os.geteuid() != 0,
        reason="needs SLURM with accounting, started as root: apt-get install slurm-wlm slurmdbd mariadb-server munge",
    ),
]
CPU_JOBS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
# long enough to be signalled after its first epoch's last.ckpt (checkpoint_every_s=0: one at every epoch's end)
LONGER = ["latent_dim=2", "data.batch_size=16", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
          "checkpoint_every_s=0"]  # fmt: skip
PREEMPTED = [*LONGER, "model=vae", "trainer.max_epochs=5"]
# the transfer study's pretraining, kept tiny: the tests are about its jobs, not its encoders
TINY_PRETRAINING = '["model=vae","trainer.max_epochs=1","trainer.limit_train_batches=2","trainer.limit_val_batches=1"]'
NOT_RESUMABLE = "resuming from a checkpoint that ended before the epoch ended"  # Lightning's warning


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A single-node cluster for this module's tests; SLURM_CONF points its commands at it."""
    folder = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "scripts" / "slurm_cluster.sh")
    started = subprocess.run([script, "start", str(folder)], capture_output=True, text=True, timeout=60)
    if started.returncode:
        pytest.fail(f"the SLURM cluster did not start: {started.stdout}{started.stderr}")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run([script, "stop", str(folder)], timeout=60)
    os.environ.pop("SLURM_CONF")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, float]:
    """The metrics of PREEMPTED run as a single run that nothing stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_train(*PREEMPTED, "hydra.run.dir=run", cwd=folder, tiny=False)
    return metrics(folder / "run")


def slurm(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def queue() -> list[str]:
    """The ids of the jobs in the queue (each array task apart)."""
    return slurm("squeue", "--noheader", "--array", "--format=%i").split()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}; the queue: {slurm('squeue', '--array')}")
        time.sleep(0.2)


def requeued(job_id: str) -> bool:
    """Whether the job is back in the queue, waiting to start again, and its earlier run has left the node."""
    waiting = "PENDING" in slurm("squeue", "--noheader", "--format=%T", "-j", job_id)
    return waiting and slurm("sinfo", "--noheader", "--Node", "--format=%T").split() == ["idle"]


def start_requeued(job_id: str) -> None:
    """Start a requeued job in 2 s instead of SLURM's 2 minutes. Not at once: slurmd refuses a job whose credential
    dates from the second in which the job's earlier run was killed ("Job credential revoked"), and the job fails."""
    wait_for(lambda: requeued(job_id), "the requeue")
    slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now+2")


def start_train(*overrides: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """train.py as a user starts it, in the background (`env` added to its environment, which its jobs inherit)."""
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.Popen(
        command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def ended(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def slurm_job_id(run_dir: Path) -> str:
    """The SLURM job (array task) that ran a job of a sweep, as Hydra's submitit launcher records it."""
    return OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id


def test_a_run_that_slurm_did_not_start_says_nothing_of_srun_on_a_machine_that_has_it(tmp_path):
    proc = run_train("model=ae", "latent_dim=2", "hydra.run.dir=run", cwd=tmp_path)
    assert "`srun` command" not in proc.stdout + proc.stderr  # Lightning's hint: for processes SLURM started


def test_a_slurm_sweep_is_a_job_array_whose_metrics_equal_the_basic_launchers(cluster, tmp_path):
    sweep = ["-m", "model=ae,vae", "latent_dim=2", "trainer.max_epochs=2"]
    by_slurm = run_train(*sweep, *CPU_JOBS, "hydra.sweep.dir=slurm", cwd=tmp_path, timeout=300)
    run_train(*sweep, "hydra.sweep.dir=basic", cwd=tmp_path, timeout=300)
    for job in ("0_model-ae", "1_model-vae"):
        assert metrics(tmp_path / "slurm" / job) == pytest.approx(metrics(tmp_path / "basic" / job), rel=1e-6)
    array, task = slurm_job_id(tmp_path / "slurm" / "1_model-vae").split("_")
    assert (array, task) == (slurm_job_id(tmp_path / "slurm" / "0_model-ae").split("_")[0], "1")  # one array
    assert queue() == []
    assert slurm("sacct", "--noheader", "-X", "--format=State", "-j", array).split() == ["COMPLETED"] * 2
    assert "2 job(s) ran to the end: 0_model-ae, 1_model-vae" in by_slurm.stdout
    assert "Run dir:" in (tmp_path / "slurm" / ".submitit" / f"{array}_0" / f"{array}_0_0_log.out").read_text()


def test_resources_from_the_config_reach_sbatch_and_each_job_uses_its_cpus(cluster, tmp_path):
    overrides = [*TINY, "-m", "model=ae", "latent_dim=2", *CPU_JOBS, "hydra.launcher.cpus_per_task=2",
                 "hydra.launcher.timeout_min=7", "hydra.launcher.partition=debug", "hydra.launcher.signal_delay_s=30",
                 "hydra.sweep.dir=sweep"]  # fmt: skip
    run_train(*overrides, cwd=tmp_path, tiny=False, timeout=300)
    job_id = slurm_job_id(tmp_path / "sweep" / "0")
    shown = slurm("scontrol", "show", "job", job_id).split()
    for setting in ("NumCPUs=2", "MinMemoryNode=2G", "TimeLimit=00:07:00", "Partition=debug", "JobState=COMPLETED"):
        assert setting in shown
    (script,) = (tmp_path / "sweep" / ".submitit" / job_id).glob("*_submission.sh")
    assert "#SBATCH --signal=USR2@30" in script.read_text().splitlines()  # the preemption signal and its grace time
    assert "torch threads: 2 in this job" in (tmp_path / "sweep" / "0" / "train.log").read_text()


@pytest.mark.parametrize("preemption", ["USR2", "requeue"])
def test_a_preempted_job_saves_is_requeued_and_ends_as_an_uninterrupted_run(
    cluster, tmp_path, uninterrupted, preemption
):
    """USR2: the launcher's signal, which SLURM sends signal_delay_s before the time limit (the job requeues
    itself); requeue: `scontrol requeue`, as the scheduler preempts a job (SIGTERM, then a requeue)."""
    sweep = start_train("-m", *PREEMPTED, *CPU_JOBS, "hydra.sweep.dir=sweep", cwd=tmp_path)
    run_dir, last = tmp_path / "sweep" / "0", tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt"
    wait_for(last.is_file, "the first epoch's last.ckpt")
    job_id = slurm_job_id(run_dir)
    if preemption == "USR2":
        slurm("scancel", "--signal=USR2", job_id)
    else:
        slurm("scontrol", "requeue", job_id)
    start_requeued(job_id)
    code, stdout, stderr = ended(sweep)
    assert code == 0, stderr[-3000:]
    assert metrics(run_dir) == pytest.approx(uninterrupted, rel=1e-6)
    log = (run_dir / "train.log").read_text()
    if preemption == "USR2":
        assert "SLURM's preemption signal SIGUSR2: stopping as on SIGTERM" in log
    assert f"{last} holds the last saved state" in log  # written when the signal came
    assert f"Job 0 was requeued by SLURM (job {job_id}, restart 1): resuming it from {last}" in log
    assert queue() == []


@pytest.mark.parametrize("where", ["loading", *STOPPED_IMPORTS])
def test_a_job_preempted_outside_fit_and_test_is_requeued_at_once_and_then_runs_to_the_end(cluster, tmp_path, where):
    """The signal lands while train.py loads, where Lightning has no SIGTERM handler and submitit's ignores it, as
    between fit and test or after the test: the job is requeued then, not left to run on. Also where the code it
    lands in turns the stop into an ImportError, as an extension module's import does (in train.py's imports, where an
    import check may swallow it, or as the job sets up training)."""
    overrides, env = STOPPED_IMPORTS[where] if where != "loading" else ([], {})
    sweep = start_train(
        "-m", *TINY, "latent_dim=2", *overrides, *CPU_JOBS, "hydra.sweep.dir=sweep", cwd=tmp_path,
        env={**STOPPED_IMPORT_PATH, **env} if where != "loading" else None,
    )  # fmt: skip
    run_dir = tmp_path / "sweep" / "0"
    log = run_dir / "train.log"  # its first line comes as the job starts, seconds before fit
    if where == "loading":
        wait_for(lambda: log.is_file() and "torch threads" in log.read_text(), "the job's start")
    else:
        wait_for((tmp_path / STOPPED_IMPORT_WAITING).is_file, "the import that waits for the signal")
    job_id = slurm_job_id(run_dir)
    slurm("scancel", "--signal=USR2", job_id)
    start_requeued(job_id)
    code, stdout, stderr = ended(sweep)
    assert code == 0, stderr[-3000:]
    text = log.read_text()
    assert "SLURM's preemption signal SIGUSR2 outside training and testing: requeueing the job" in text
    assert f"Job 0 was requeued by SLURM (job {job_id}, restart 1) before its first checkpoint" in text
    assert "Run dir:" in text and "test/loss" in metrics(run_dir)
    assert queue() == []


def test_lightnings_slurm_auto_requeue_is_off_so_its_signal_writes_no_mid_epoch_checkpoint(cluster, tmp_path):
    """SIGUSR1 during fit, on which Lightning's auto-requeue wrote a mid-epoch hpc_ckpt (a resume from it is not
    exact) and requeued the job: now nothing handles it, so it ends the job as a kill does."""
    many_epochs = ["model=ae", "latent_dim=2", "trainer.max_epochs=100", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1", "checkpoint_every_s=0"]  # fmt: skip
    sweep = start_train("-m", *many_epochs, *CPU_JOBS, "hydra.sweep.dir=sweep", cwd=tmp_path)
    run_dir = tmp_path / "sweep" / "0"
    wait_for((run_dir / "checkpoints" / "last.ckpt").is_file, "the first epoch's last.ckpt")
    job_id = slurm_job_id(run_dir)
    slurm("scancel", "--signal=USR1", job_id)
    state = ["squeue", "--noheader", "--format=%T", "-j", job_id]
    wait_for(lambda: slurm(*state).split() in ([], ["PENDING"]), "the job's end or requeue", 60)
    assert list(tmp_path.rglob("hpc_ckpt_*.ckpt")) == []
    assert queue() == []  # not requeued
    assert slurm("sacct", "--noheader", "-X", "--format=State", "-j", job_id).split() == ["FAILED"]
    sweep.kill()  # it would end listing the job as crashed, as after a kill
    sweep.communicate()


def test_a_ddp_job_of_two_slurm_tasks_scores_a_checkpoint_as_one_process_does(cluster, tmp_path):
    """trainer=ddp with tasks_per_node=2 on CPU (gloo): srun starts both processes and Lightning takes their ranks
    from SLURM. The test split scored by the two equals one process's scores (as tests/test_scale.py's DDP test)."""
    run = ["model=vae", "latent_dim=2", "model.nll_samples=10", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=1", "trainer.accelerator=cpu"]  # fmt: skip
    run_train(*run, "hydra.run.dir=single", cwd=tmp_path, tiny=False)
    trained = tmp_path / "single" / "checkpoints" / "last.ckpt"  # the DDP job only tests it
    ddp = ["trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=2", f"ckpt_path={trained}"]
    run_train("-m", *run, *ddp, *CPU_JOBS, "hydra.sweep.dir=sweep", cwd=tmp_path, tiny=False, timeout=300)
    job, job_id = tmp_path / "sweep" / "0", slurm_job_id(tmp_path / "sweep" / "0")
    assert f"{job_id}.0|2" in slurm("sacct", "--noheader", "--parsable2", "--format=JobID,NTasks", "-j", job_id)
    assert metrics(job) == pytest.approx(metrics(tmp_path / "single"), rel=0, abs=1e-5)
    rank_0, rank_1 = (job / "train.log").read_text(), (job / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank_1 and "Run dir:" not in rank_1  # as under Lightning's own launcher
    assert "Run dir:" in rank_0 and "GLOBAL_RANK: 1" not in rank_0
    assert [p.name for p in (job / ".hydra").iterdir() if p.is_dir()] == []  # rank 1 saved no config as an attempt
    assert "auto-requeue" not in rank_0 + rank_1  # Lightning's SIGUSR1 handler is not set


def test_a_killed_job_fails_the_sweep_naming_it_and_a_rerun_resumes_it_and_skips_the_finished(cluster, tmp_path):
    command = ["-m", *LONGER, "model=ae,vae", "trainer.max_epochs=5", *CPU_JOBS, "hydra.sweep.dir=sweep"]
    sweep = start_train(*command, cwd=tmp_path)
    killed, done = tmp_path / "sweep" / "1_model-vae", tmp_path / "sweep" / "0_model-ae"
    wait_for((killed / "checkpoints" / "last.ckpt").is_file, "the first epoch's last.ckpt")
    job_id = slurm_job_id(killed)
    slurm("scancel", "--signal=KILL", job_id)
    code, stdout, stderr = ended(sweep)
    log = Path("sweep", ".submitit", job_id, f"{job_id}_0_log")  # as relative as the sweep dir given
    assert code == 1
    assert "1_model-vae: crashed: it stopped without writing metrics.json" in stderr
    assert f"(SLURM job {job_id}, its log: {log}.out, stderr: {log}.err)" in stderr
    assert "CANCELLED" in (tmp_path / f"{log}.err").read_text()
    state = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] >= 0 and not (killed / "metrics.json").exists()
    finished = (done / "metrics.json").read_bytes()

    rerun = run_train(*command, cwd=tmp_path, tiny=False, timeout=300)
    assert "1 job(s) had finished in an earlier invocation of the sweep" in rerun.stdout
    assert (done / "metrics.json").read_bytes() == finished
    assert "stopped in an earlier run of this sweep: resuming it from" in (killed / "train.log").read_text()
    assert metrics(killed)["test/nll"] > 0


def test_a_failing_job_fails_the_sweep_naming_its_slurm_job_and_log(cluster, tmp_path):
    proc = run_train("-m", "model=ae", "latent_dim=2,0", *CPU_JOBS, "hydra.sweep.dir=sweep", cwd=tmp_path, check=False)
    job_id = slurm_job_id(tmp_path / "sweep" / "1_latent_dim-0")
    log = Path("sweep", ".submitit", job_id, f"{job_id}_0_log")
    assert proc.returncode == 1
    assert "1_latent_dim-0: failed: latent_dim=0" in proc.stderr
    assert f"(SLURM job {job_id}, its log: {log}.out, stderr: {log}.err)" in proc.stderr
    assert "Job 1 failed: latent_dim=0" in (tmp_path / f"{log}.out").read_text()
    assert (tmp_path / "sweep" / "0_latent_dim-2" / "metrics.json").is_file()


def test_the_transfer_study_pretrains_in_one_job_then_classifies_in_an_array(cluster, tmp_path):
    study = tmp_path / "study"
    run_train("experiment=transfer", "transfer=frozen,pixels", "data.labels_per_class=1", "seed=0",
              "trainer.max_steps=2", "trainer.val_check_interval=1", f"hydra.sweeper.pretrain={TINY_PRETRAINING}",
              *CPU_JOBS, f"hydra.sweep.dir={study}", cwd=tmp_path, tiny=False, timeout=300)  # fmt: skip
    pretrained = slurm_job_id(study / "pretrain" / "seed-0")
    classifiers = sorted(slurm_job_id(p.parent.parent) for p in study.glob("*/.hydra/hydra.yaml"))
    (array,) = {c.split("_")[0] for c in classifiers}  # one array of two tasks, after the pretraining's job
    assert len(classifiers) == 2 and "_" not in pretrained and pretrained != array
    times = slurm("sacct", "--noheader", "-X", "--format=JobID,Start,End", "-j", f"{pretrained},{array}").split()
    pretrain_end, classifier_starts = times[2], times[4::3]
    assert all(start >= pretrain_end for start in classifier_starts)  # ISO times: the pretraining ended first
    table = (study / "transfer.md").read_text()
    assert "frozen" in table and "pixels" in table
    assert queue() == []


def test_a_transfer_classifier_preempted_inside_an_epoch_resumes_exactly(cluster, tmp_path):
    """The study's classifiers validate every 25 steps (val_check_interval), and each of its last.ckpt here is saved
    inside an epoch (100 labelled images in batches of 8: 13 steps an epoch, and no multiple of 25 up to 300 is one
    of 13). One preempted after its first last.ckpt (its 300 steps take a second or two, a window wide enough for
    the signal to land in training) is requeued, resumes from the state it held, and ends with the metrics of the same
    study never stopped, with no word from Lightning of a mid-epoch checkpoint that it cannot resume."""
    steps_per_epoch, max_steps = 13, 300
    study = ["experiment=transfer", "transfer=finetune", "data.labels_per_class=10", "data.batch_size=8", "seed=0",
             f"trainer.max_steps={max_steps}", "checkpoint_every_s=0",
             f"hydra.sweeper.pretrain={TINY_PRETRAINING}"]  # fmt: skip
    sweep = start_train(*study, *CPU_JOBS, "hydra.sweep.dir=study", cwd=tmp_path)

    def lasts() -> list[Path]:
        return list(tmp_path.glob("study/*transfer-finetune/checkpoints/last.ckpt"))

    wait_for(lambda: bool(lasts()), "the classifier's first last.ckpt (at its first validation, step 25)")
    (last,) = lasts()
    run_dir, job_id = last.parent.parent, slurm_job_id(last.parent.parent)
    slurm("scancel", "--signal=USR2", job_id)
    # the same study uninterrupted, by the basic launcher, its classifier on the same pretrained encoder
    pretrained = tmp_path / "study" / "pretrain" / "seed-0" / "checkpoints" / "last.ckpt"
    reference = start_train(*study, f"encoder_ckpt={pretrained}", "hydra.sweep.dir=reference", cwd=tmp_path)
    wait_for(lambda: requeued(job_id), "the requeue")
    state = torch.load(last, map_location="cpu", weights_only=True)  # what the requeued job resumes from
    in_epoch = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert 25 <= state["global_step"] < max_steps and state["global_step"] % 25 == 0, "the signal came after fit"
    assert state["global_step"] % steps_per_epoch != 0 and in_epoch == state["global_step"] % steps_per_epoch
    start_requeued(job_id)
    code, stdout, stderr = ended(sweep)
    assert code == 0, stderr[-3000:]
    code, reference_stdout, reference_stderr = ended(reference)
    assert code == 0, reference_stderr[-3000:]
    (uninterrupted,) = (tmp_path / "reference").glob("*transfer-finetune")
    assert metrics(run_dir) == pytest.approx(metrics(uninterrupted), rel=1e-6)
    log = (run_dir / "train.log").read_text()
    assert "SLURM's preemption signal SIGUSR2: stopping as on SIGTERM" in log
    assert f"{last} holds the last saved state" in log
    assert f"Job {run_dir.name} was requeued by SLURM (job {job_id}, restart 1): resuming it from {last}" in log
    logs = {p for p in tmp_path.rglob("*") if p.suffix in (".log", ".out", ".err") and p.is_file()}
    console = tmp_path / "study" / ".submitit" / job_id / f"{job_id}_0_log"  # Lightning's warnings go to its .err
    assert {run_dir / "train.log", Path(f"{console}.out"), Path(f"{console}.err")} <= logs
    texts = [p.read_text() for p in logs] + [stdout, stderr, reference_stdout, reference_stderr]
    assert not [text for text in texts if NOT_RESUMABLE in text]
    assert queue() == []
