"""Scaling out on Hydra launchers and sweepers and Lightning strategies: parallel and SLURM sweeps, DDP, Optuna."""

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import joblib
import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from autoencoders.models import VQVAE
from tests.helpers import ROOT, run_train

THREADS_LINE = re.compile(r"^\[(.{23})\].*torch threads: (\d+) in this job \(process (\d+)\)", re.M)


@pytest.mark.slow  # in `pytest -m slow`: the default run must stay under 6 minutes
def test_joblib_sweep_runs_jobs_in_parallel_processes_that_share_the_cores(tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=ae,vae", "latent_dim=2",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((job / "metrics.json").is_file() for job in jobs)
    logs = [THREADS_LINE.search((job / "train.log").read_text()).groups() for job in jobs]
    starts, threads, pids = zip(*logs, strict=True)
    assert len(set(pids)) == 2  # two worker processes
    assert all(2 * int(n) <= joblib.cpu_count() for n in threads)  # jobs x threads <= cores
    begun = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in starts]
    ended = [(job / "metrics.json").stat().st_mtime for job in jobs]
    assert max(begun) < min(ended)  # each job started before the other one finished


def test_slurm_launcher_config_composes_with_its_keys():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.autoencoders_slurm.SlurmLauncher"  # Hydra's submitit launcher's subclass
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 0, 240)  # 0: a CPU partition
    assert launcher.array_parallelism == 16 and launcher.tasks_per_node == 1


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_a_slurm_sweep_without_slurm_is_a_clear_error_before_anything_is_written(tmp_path):
    proc = run_train(
        "-m", "hydra/launcher=slurm", "model=ae,vae", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: hydra/launcher=slurm submits each job with SLURM's sbatch")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_submitit_local_launcher_runs_a_sweep_offline_sharing_the_cores_and_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", "hydra/launcher=submitit_local", "latent_dim=2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    (log,) = sweep.glob("0*/train.log")
    assert (sweep / ".submitit").is_dir()  # the job ran as a submitit job, in its own process
    _, threads, _ = THREADS_LINE.search(log.read_text()).groups()
    assert int(threads) == 1  # submitit_local starts every job at once: one thread each unless cpus_per_task says
    assert f"sweep {sweep}: 1 job(s) ran to the end" in proc.stdout


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_ddp_test_metrics_equal_one_process_and_only_rank_zero_writes(tmp_path):
    """The test split scored by 2 DDP processes (no padded repeats; sums and counts added up over processes; a VAE's
    noise seeded per batch) equals one process's scores of the same checkpoint."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # the whole test split
    run = ["model=vae", "latent_dim=2", "model.nll_samples=10", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=1", "trainer.accelerator=cpu"]  # fmt: skip
    run_train(*run, f"hydra.run.dir={single}", cwd=tmp_path, tiny=False)
    shutil.copytree(single, ddp)
    ddp_run = ["trainer=ddp", "trainer.devices=2", "ckpt_path=last", f"hydra.run.dir={ddp}"]  # trained: it only tests
    run_train(*run, *ddp_run, cwd=tmp_path, tiny=False)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (ddp / "train_ddp_process_1.log").read_text()
    expected, got = (json.loads((run / "metrics.json").read_text()) for run in (single, ddp))
    assert got.keys() == expected.keys() and {"test/elbo", "test/nll", "test/recon"} <= got.keys()
    assert all(abs(got[k] - expected[k]) < 1e-5 for k in got), (got, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]  # rank 1 made no run dir of its own
    new = {p.name for p in ddp.glob("events.out.tfevents.*")} - {p.name for p in single.iterdir()}
    writers = {name.split(".")[-2] for name in new}
    assert len(writers) == 1  # ...<host>.<pid>.<n>: TensorBoard hears from one process, rank 0


def ema_steps(rank: int, world_size: int, folder: Path) -> None:
    """Three EMA codebook updates of one VQ-VAE on `rank`'s quarter of each batch (all of it for one process)."""
    if world_size > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank,
                                             world_size=world_size)  # fmt: skip
    torch.manual_seed(0)  # the same weights and batches in every process
    model = VQVAE(image_shape=(1, 28, 28), latent_dim=8, embedding_dim=4, codebook_size=16).train()
    for _ in range(3):
        batch = torch.rand(16, 1, 28, 28)
        per_process = len(batch) // world_size
        model.loss_terms(batch[rank * per_process : (rank + 1) * per_process])
    torch.save(model.codebook.detach(), folder / f"codebook-{world_size}-{rank}.pt")


def test_a_vq_vaes_ema_codebook_is_the_same_in_every_ddp_process_and_as_on_one(tmp_path):
    """Each process sees its share of the batch; the codebook must follow the statistics of the whole batch."""
    torch.multiprocessing.start_processes(ema_steps, args=(2, tmp_path), nprocs=2, start_method="fork")  # no imports
    ema_steps(0, 1, tmp_path)
    one, *ddp = (torch.load(tmp_path / f"codebook-{n}.pt") for n in ("1-0", "2-0", "2-1"))
    assert torch.equal(ddp[0], ddp[1])
    torch.testing.assert_close(ddp[0], one)
    torch.manual_seed(0)
    initial = VQVAE(image_shape=(1, 28, 28), latent_dim=8, embedding_dim=4, codebook_size=16).codebook.detach()
    assert (one - initial).abs().max() > 0.01  # the updates moved it


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_a_non_finite_loss_on_any_ddp_process_stops_them_all_with_the_error_and_no_hang(tmp_path):
    started = time.monotonic()
    proc = run_train("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "model=ae", "latent_dim=2",
                     "optimizer=sgd", "optimizer.lr=1e6", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, check=False, tiny=False, timeout=60)  # fmt: skip
    assert time.monotonic() - started < 60
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"^error: The training loss became non-finite \(loss = \S+\) at step \d+", proc.stderr, re.M)
    assert proc.stderr.count("error:") == 1  # said once, by rank 0 (rank 1 only logs it)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))  # diverged in the first epoch: nothing saved


@pytest.mark.slow  # in `pytest -m slow`: the default run must stay under 6 minutes
def test_optuna_search_keeps_its_study_in_the_sweep_dir_resumes_it_and_records_failed_trials(tmp_path):
    sweep = tmp_path / "study"
    search = ["-m", "hparams_search=vae_optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
    run_train(*search, cwd=tmp_path)
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    first = optuna.load_study(study_name="vae", storage=storage).trials
    assert [t.state for t in first] == [TrialState.COMPLETE] * 2
    assert {"latent_dim", "kl_weight", "optimizer.lr"} == set(first[0].params)

    # Run the same search again (it resumes), this time with a value that makes every trial fail.
    proc = run_train(*search, "kl_weight=-1", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: 2 job(s) of the sweep" in proc.stderr
    study = optuna.load_study(study_name="vae", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2
    assert study.best_value == max(t.value for t in first)  # maximised val/elbo
    assert sorted(int(job.parent.name.split("_")[0]) for job in sweep.glob("*/.hydra")) == [0, 1, 2, 3]  # trials
    assert "2 job(s) had finished in an earlier invocation of the sweep" in proc.stdout
    assert Path(sweep / "optimization_results.yaml").is_file()
