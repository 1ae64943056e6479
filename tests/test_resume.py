"""The resume matrix: every model family, under each validation schedule, stopped by SIGKILL at a random step after
its first checkpoint, resumed, stopped again by SIGTERM, and resumed to the end, ends with exactly the metrics of
the same run never stopped (metrics.json, and the training epochs' means it logged), and never resumes from a state
that Lightning calls mid-epoch and not resumable.

Each run is the real train.py (through tests/faulty_train.py, which adds the faults), in a process forked from a
server that has imported torch, Lightning and the package once (multiprocessing's forkserver): what a subprocess
does, without its 5 s of imports, so the 64 runs fit in the fast suite."""

import csv
import multiprocessing
import os
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, metrics

PRELOAD = ["torch", "lightning", "hydra", "autoencoders.training", "autoencoders.callbacks", "tests.faulty_train"]
NOT_RESUMABLE = "resuming from a checkpoint that ended before the epoch ended"
STEPS = 9  # 3 epochs of 3 batches
RUN = [
    "latent_dim=2", "data.batch_size=16", "trainer.max_epochs=3", "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.accelerator=cpu",
    "+trainer.deterministic=true", "checkpoint_every_s=0", "logger=csv", "callbacks.images=null",
    "callbacks.progress_bar=null", "trainer.log_every_n_steps=1",
]  # fmt: skip
INSIDE_EPOCHS = ["+trainer.val_check_interval=2", "+trainer.check_val_every_n_epoch=null"]
SCHEDULES = {"epoch_end": [], "inside_epochs": INSIDE_EPOCHS}
FAMILIES = {  # "{vae}": a VAE checkpoint that the module's fixture trains
    "ae": ["model=ae"],
    "vae": ["model=vae"],
    "conv_vae": ["model=conv_vae", "model.widths=[4,8]"],
    "vqvae": ["model=vqvae", "latent_dim=4", "model.embedding_dim=2", "model.codebook_size=8"],
    "factor_vae": ["model=factor_vae"],  # manual optimization: two optimizers a step
    # labelled and unlabelled batches; validated, chosen and tested on a moving average of the weights
    "m2_ema": ["model=m2", "data.labels_per_class=2", "model.nll_samples=2", "+callbacks=ema"],
    # augmented: the draws of each training batch, of both kinds of batch (labelled, and M2's labelled + unlabelled)
    "m1m2_augmented": ["model=m2", "data.labels_per_class=2", "model.nll_samples=2", "encoder_ckpt={vae}",
                       "augment=affine", "model.consistency=1"],
    "classifier_augmented": ["model=classifier", "data.labels_per_class=5", "encoder_ckpt={vae}",
                             "model.method=finetune", "augment=affine"],
}  # fmt: skip


def _run(fault: str, overrides: list[str], log: Path) -> None:
    """In the forked process: train.py with `fault` (tests/faulty_train.py), its console appended to `log`."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if fault:
        os.environ["FAULT"] = fault
        sys.argv = ["faulty_train.py", *overrides]
        from tests import faulty_train

        faulty_train.main()
    else:
        sys.argv = [str(ROOT / "train.py"), *overrides]
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """train(run_dir, overrides, fault="") -> the exit code of train.py in a forked process."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    sys.path.insert(0, str(ROOT))  # the forkserver imports `tests.faulty_train` with the parent's sys.path

    def run(run_dir: Path, overrides: list[str], fault: str = "") -> int:
        log = run_dir.parent / f"{run_dir.name}.log"
        process = context.Process(target=_run, args=(fault, [*overrides, f"hydra.run.dir={run_dir}"], log))
        process.start()
        process.join(timeout=300)
        return process.exitcode

    return run


def epoch_means(run_dir: Path) -> dict[tuple[int, str], str]:
    """The training epochs' means that the run's attempts logged (logger=csv: a version each), by (epoch, name); an
    epoch logged again by a later attempt, the later value."""
    logged = {}
    for log in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name[8:])):
        for row in csv.DictReader(log.open()):
            logged |= {(int(row["epoch"]), k): v for k, v in row.items() if k.endswith("_epoch") and v}
    return logged


@pytest.fixture(scope="module")
def vae_ckpt(train, tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("pretrain") / "vae"
    assert train(run_dir, [*RUN, "model=vae", "trainer.max_epochs=1"]) == 0
    return str(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_killed_then_stopped_by_sigterm_resumes_to_the_metrics_of_one_never_stopped(
    family, schedule, train, vae_ckpt, tmp_path
):
    overrides = [*RUN, *(o.format(vae=vae_ckpt) for o in FAMILIES[family]), *SCHEDULES[schedule]]
    first_checkpoint = 3 if schedule == "epoch_end" else 2  # the step after which the first last.ckpt is written
    check_stopped_twice_ends_as_never_stopped(train, overrides, first_checkpoint, f"{family}-{schedule}", tmp_path)


def test_a_run_that_accumulates_gradients_resumes_exactly_when_validation_falls_between_the_batches_of_a_step(
    train, tmp_path
):
    """3 batches an epoch, 2 a step, validation every 3 batches (after the first batch of a step, whose gradients no
    checkpoint holds: last.ckpt keeps the state before), and each batch its own noise."""
    overrides = [*RUN, "model=vae", "+trainer.accumulate_grad_batches=2", "trainer.max_epochs=4",
                 "+trainer.val_check_interval=3", "+trainer.check_val_every_n_epoch=null"]  # fmt: skip
    check_stopped_twice_ends_as_never_stopped(train, overrides, 2, "accumulating", tmp_path, steps=8)


def check_stopped_twice_ends_as_never_stopped(
    train, overrides: list[str], first_checkpoint: int, case: str, tmp_path: Path, steps: int = STEPS
) -> None:
    """SIGKILL at a random optimizer step after `first_checkpoint`, resume, SIGTERM at a later one, resume: the
    metrics and the logged epoch means are the run's never stopped."""
    assert train(tmp_path / "whole", overrides) == 0
    chance = random.Random(case)
    kill = chance.randint(first_checkpoint + 1, steps - 3)
    term = chance.randint(kill + 1, steps - 1)
    stopped = tmp_path / "stopped"
    assert train(stopped, overrides, f"kill@{kill}") == -9
    assert train(stopped, [*overrides, "ckpt_path=last"], f"term@{term}") == 143, f"killed at {kill}"
    assert train(stopped, [*overrides, "ckpt_path=last"]) == 0
    assert metrics(stopped) == pytest.approx(metrics(tmp_path / "whole"), rel=1e-6), f"kill@{kill} term@{term}"
    whole, resumed = epoch_means(tmp_path / "whole"), epoch_means(stopped)
    assert resumed.keys() <= whole.keys() and max(whole) in resumed  # a SIGKILL may lose rows not yet flushed
    assert {k: float(v) for k, v in resumed.items()} == pytest.approx({k: float(whole[k]) for k in resumed}, rel=1e-6)
    consoles = (tmp_path / "stopped.log").read_text()
    assert NOT_RESUMABLE not in consoles
    assert "error: stopped by SIGTERM at step" in consoles
