"""train.py on a real single-node SLURM cluster (scripts/slurm_cluster.sh: Debian's slurm-wlm and munge, started by
root in a temporary folder), and beside SLURM's commands. Skipped where they are not installed."""

import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, TINY, run_train

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun")
needs_slurm = pytest.mark.skipif(
    any(shutil.which(d) is None for d in DAEMONS) or os.geteuid() != 0,
    reason="needs SLURM, started as root: apt-get install slurm-wlm munge",
)
CPU_JOBS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


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


def queue() -> list[str]:
    return subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True).stdout.split()


@pytest.mark.slow  # a train.py subprocess: `pytest -m slow`
@needs_slurm
def test_a_run_that_slurm_did_not_start_says_nothing_of_srun_on_a_machine_that_has_it(tmp_path):
    proc = run_train("model=ae", "latent_dim=2", "hydra.run.dir=run", cwd=tmp_path)
    assert "`srun` command" not in proc.stdout + proc.stderr  # Lightning's hint: for processes SLURM started


@pytest.mark.slow  # two sweeps: `pytest -m slow`
@needs_slurm
def test_a_slurm_sweep_is_a_job_array_whose_metrics_equal_the_basic_launchers(cluster, tmp_path):
    sweep = ["-m", "model=ae,vae", "latent_dim=2", "trainer.max_epochs=2"]
    slurm = run_train(*sweep, *CPU_JOBS, "hydra.sweep.dir=slurm", cwd=tmp_path, timeout=300)
    run_train(*sweep, "hydra.sweep.dir=basic", cwd=tmp_path, timeout=300)
    for job in ("0_model-ae", "1_model-vae"):
        by_slurm, basic = (json.loads((tmp_path / d / job / "metrics.json").read_text()) for d in ("slurm", "basic"))
        assert by_slurm.keys() == basic.keys()
        assert all(by_slurm[k] == pytest.approx(basic[k], rel=1e-6) for k in basic)
    assert queue() == []
    assert "2 job(s) ran to the end: 0_model-ae, 1_model-vae" in slurm.stdout
    (log,) = (tmp_path / "slurm" / ".submitit").glob("*_0/*_0_log.out")  # the array's first task's log
    assert "Run dir:" in log.read_text()


@pytest.mark.slow
@needs_slurm
def test_resources_from_the_config_reach_sbatch_and_each_job_uses_its_cpus(cluster, tmp_path):
    overrides = [*TINY, "-m", "model=ae", "latent_dim=2", *CPU_JOBS, "hydra.launcher.cpus_per_task=2",
                 "hydra.launcher.timeout_min=7", "hydra.launcher.partition=debug", "hydra.sweep.dir=sweep"]  # fmt: skip
    run_train(*overrides, cwd=tmp_path, tiny=False, timeout=300)
    (job_id,) = (p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.is_dir())
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    for setting in ("NumCPUs=2", "MinMemoryNode=2G", "TimeLimit=00:07:00", "Partition=debug", "JobState=COMPLETED"):
        assert setting in shown.split()
    assert "torch threads: 2 in this job" in (tmp_path / "sweep" / "0" / "train.log").read_text()
