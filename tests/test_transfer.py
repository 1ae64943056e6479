"""The transfer study's sweeper: the pretraining is a job of the configured launcher (tests/test_classifier.py runs
the whole study under the default launcher)."""

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from autoencoders.cli import FAILURE_FILE
from autoencoders.transfer import JOBS_DIR, Cell, markdown
from tests.helpers import ROOT, run_train

TINY_PRETRAIN = '["model=vae","trainer.max_epochs=1","trainer.limit_train_batches=2","trainer.limit_val_batches=1"]'


class FailingLauncher:
    """Runs nothing: the jobs it gets fail as train.py records a failed sweep job, or are lost (`lost`)."""

    def __init__(self, pretrain_dir: Path, lost: bool) -> None:
        self.pretrain_dir, self.lost, self.launched = pretrain_dir, lost, []

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        self.launched.append([list(o) for o in job_overrides])
        if self.lost:
            raise RuntimeError("job 1234 has state CANCELLED")
        for seed in (0, 1):
            (self.pretrain_dir / f"seed-{seed}").mkdir(parents=True)
            (self.pretrain_dir / f"seed-{seed}" / FAILURE_FILE).write_text(
                json.dumps({"error": "kl_weight=-1.0 is negative."})
            )
        return [JobReturn(overrides=o, status=JobStatus.COMPLETED) for o in job_overrides]  # train.py's value: None


@pytest.mark.parametrize("lost,reason", [(False, "seed 0 failed, .*kl_weight=-1.0 is negative"),
                                         (True, "failed, .*RuntimeError: job 1234")])  # fmt: skip
def test_the_pretraining_per_seed_is_the_launchers_first_batch_and_a_failed_one_stops_the_study(
    tmp_path, monkeypatch, lost, reason
) -> None:
    monkeypatch.chdir(tmp_path)  # the study's default sweep dir, outputs/transfer/<time>
    # one method and label count: the sweeper composes and checks every classifier job's config first (~0.1 s each)
    overrides = ["experiment=transfer", "latent_dim=8", "seed=0,1", "transfer=frozen", "data.labels_per_class=1"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        config = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        sweeper = instantiate(config.hydra.sweeper)
        sweeper.config, sweeper.hydra_context = config, HydraContext(config_loader=loader, callbacks=None)
        sweeper.launcher = FailingLauncher(Path(config.hydra.sweep.dir) / "pretrain", lost)
        with pytest.raises(SystemExit, match=rf"^error: pretraining the encoders? (for )?{reason}"):
            sweeper.sweep(list(config.hydra.overrides.task))
        (batch,) = sweeper.launcher.launched  # no classifier job was launched
        shared = ["latent_dim=8", "model=vae", "model.arch=mlp", "trainer.max_epochs=30", "hydra/sweeper=transfer",
                  "hydra.mode=MULTIRUN", f"hydra.sweep.dir='{config.hydra.sweep.dir}'"]  # fmt: skip
        assert batch == [[*shared, f"seed={s}", f"hydra.sweep.subdir=pretrain/seed-{s}"] for s in (0, 1)]
        job = loader.load_sweep_config(config, batch[0])  # what train.py runs: a VAE, not experiment=transfer's
    assert (job.model._target_, job.latent_dim, job.hydra.mode) == ("autoencoders.models.VAE", 8, RunMode.MULTIRUN)
    assert job.hydra.sweep.dir == config.hydra.sweep.dir


@pytest.mark.slow  # 40-60 s on 2 cores: three processes (the sweeper and two submitit jobs) each import torch
def test_a_study_under_submitit_local_pretrains_in_a_submitit_job_of_its_own(tmp_path: Path) -> None:
    """The README's command (tests/helpers.py's TINY and these), into the default sweep dir."""
    run_train(
        "experiment=transfer",
        "hydra/launcher=submitit_local",
        "transfer=frozen",
        "data.labels_per_class=1",
        "seed=0",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        f"hydra.sweeper.pretrain={TINY_PRETRAIN}",
        cwd=tmp_path,
    )
    (sweep,) = (tmp_path / "outputs" / "transfer").iterdir()
    pretrain = OmegaConf.load(sweep / "pretrain" / "seed-0" / ".hydra" / "hydra.yaml").hydra
    assert "experiment=transfer" not in pretrain.overrides.task
    config = OmegaConf.load(sweep / "pretrain" / "seed-0" / ".hydra" / "config.yaml")
    assert config.model._target_ == "autoencoders.models.VAE"
    (classifier,) = (p.parent.parent for p in sweep.glob("_*/.hydra/hydra.yaml"))
    job_ids = [pretrain.job.id, OmegaConf.load(classifier / ".hydra" / "hydra.yaml").hydra.job.id]
    for job_id in job_ids:  # submitit's job ids; its record of each job's result and output
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_result.pkl").is_file()
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").is_file()
    assert job_ids[0] != job_ids[1]
    with (sweep / "transfer.csv").open() as f:
        (row,) = csv.DictReader(f)
    test_acc = json.loads((classifier / "metrics.json").read_text())["test/acc"]
    assert (row["method"], row["labels_per_class"], row["runs"]) == ("frozen", "1", "1")
    assert row["test_acc_mean_pct"] == f"{100 * test_acc:.2f}"


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_a_finished_study_run_again_with_a_method_added_runs_only_the_new_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    study = ["experiment=transfer", "data.labels_per_class=1", "seed=0", "trainer.max_steps=2",
             "trainer.val_check_interval=1", f"hydra.sweeper.pretrain={TINY_PRETRAIN}",
             f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_train(*study, "transfer=frozen,pixels", cwd=tmp_path)
    finished = {p: p.stat().st_mtime_ns for p in sweep.glob("**/metrics.json")}
    assert len(finished) == 3  # the pretraining and two classifiers
    proc = run_train(*study, "transfer=frozen,pixels,scratch", cwd=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # untouched: skipped
    assert len(list(sweep.glob("**/metrics.json"))) == 4 and proc.stdout.count("skipped") >= 3
    with (sweep / "transfer.csv").open() as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["frozen", "scratch", "pixels"]


@pytest.mark.parametrize(
    "method,model,schedule",
    [
        ("frozen", "Classifier", (-1, 500, 25, None)),
        ("m2", "M2", (-1, 6400, 100, None)),
        ("m1m2", "M2", (-1, 6400, 100, None)),
        ("knn", "Classifier", (1, -1, 1.0, 1)),  # validated at the end of its one epoch
    ],
)
def test_each_method_of_the_study_has_its_model_and_schedule_unless_the_command_line_says(method, model, schedule):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["experiment=transfer", f"transfer={method}"])
        given = compose("train", ["experiment=transfer", f"transfer={method}", "trainer.max_steps=3"])
    keys = ("max_epochs", "max_steps", "val_check_interval", "check_val_every_n_epoch")
    assert tuple(cfg.trainer[k] for k in keys) == schedule
    assert cfg.model._target_ == f"autoencoders.models.{model}" and given.trainer.max_steps == 3


@pytest.mark.parametrize(
    "overrides,job,cause",
    [
        (["transfer=knn", "data.labels_per_class=0"], "transfer=knn data.labels_per_class=0 seed=0",
         "data.labels_per_class=0 is not positive"),
        (["transfer=m1m2,m2", "trainer.max_steps=20"], "transfer=m1m2 data.labels_per_class=1 seed=0",
         "trainer.max_steps=20 ends before the first validation at trainer.val_check_interval=100"),
    ],
)  # fmt: skip
def test_a_study_with_a_classifier_job_that_train_py_refuses_stops_before_any_pretraining(
    tmp_path: Path, overrides: list[str], job: str, cause: str
) -> None:
    """Each classifier job's config is composed and checked as train.py checks it, before the first pretraining."""
    sweep = tmp_path / "sweep"
    proc = run_train("experiment=transfer", "seed=0", *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    (paragraph,) = proc.stderr.splitlines()  # one `error:` paragraph, no traceback
    assert paragraph.startswith(f"error: the transfer study's classifier job {job} ") and cause in paragraph
    assert "stops before any pretraining" in paragraph and "objective" not in paragraph
    assert "Traceback" not in proc.stdout and not (sweep / "pretrain").exists() and not (sweep / JOBS_DIR).exists()


@pytest.mark.parametrize(("runs", "said"), [((1,), "over 1 seed (each"), ((3,), "over 3 seeds (each"),
                                            ((1, 3), "over 1/3 seeds (each")])  # fmt: skip
def test_the_study_table_counts_its_seeds_in_words(runs: tuple[int, ...], said: str) -> None:
    table = markdown([Cell("m2", 10 * i + 1, n, 90.0, 1.0) for i, n in enumerate(runs)])
    assert said in table
