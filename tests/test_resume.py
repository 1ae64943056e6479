"""The resume matrix: every model family, under each validation schedule, stopped by SIGKILL at a random step after
its first checkpoint, resumed, stopped again by SIGTERM, and resumed to the end, ends with exactly the metrics of
the same run never stopped, and never resumes from a state that Lightning calls mid-epoch and not resumable.

Each run is the real train.py (through tests/faulty_train.py, which adds the faults), in a process forked from a
server that has imported torch, Lightning and the package once (multiprocessing's forkserver): what a subprocess
does, without its 5 s of imports, so the 64 runs fit in the fast suite."""

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
    "+trainer.deterministic=true", "checkpoint_every_s=0", "~logger", "callbacks.images=null",
    "callbacks.progress_bar=null", "trainer.log_every_n_steps=1",
]  # fmt: skip
SCHEDULES = {
    "epoch_end": [],
    "inside_epochs": ["+trainer.val_check_interval=2", "+trainer.check_val_every_n_epoch=null"],
}
FAMILIES = {  # "{vae}": a VAE checkpoint that the module's fixture trains
    "ae": ["model=ae"],
    "vae": ["model=vae"],
    "conv_vae": ["model=conv_vae", "model.widths=[4,8]"],
    "vqvae": ["model=vqvae", "latent_dim=4", "model.embedding_dim=2", "model.codebook_size=8"],
    "factor_vae": ["model=factor_vae"],  # manual optimization: two optimizers a step
    "m2": ["model=m2", "data.labels_per_class=2", "model.nll_samples=2"],  # labelled and unlabelled batches
    "m1m2": ["model=m2", "data.labels_per_class=2", "model.nll_samples=2", "encoder_ckpt={vae}"],
    "classifier": ["model=classifier", "data.labels_per_class=5", "encoder_ckpt={vae}", "model.method=finetune"],
}


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
    assert train(tmp_path / "whole", overrides) == 0
    first_checkpoint = 3 if schedule == "epoch_end" else 2  # the step after which the first last.ckpt is written
    chance = random.Random(f"{family}-{schedule}")
    kill = chance.randint(first_checkpoint + 1, STEPS - 3)
    term = chance.randint(kill + 1, STEPS - 1)
    stopped = tmp_path / "stopped"
    assert train(stopped, overrides, f"kill@{kill}") == -9
    assert train(stopped, [*overrides, "ckpt_path=last"], f"term@{term}") == 143, f"killed at {kill}"
    assert train(stopped, [*overrides, "ckpt_path=last"]) == 0
    assert metrics(stopped) == pytest.approx(metrics(tmp_path / "whole"), rel=1e-6), f"kill@{kill} term@{term}"
    consoles = (tmp_path / "stopped.log").read_text()
    assert NOT_RESUMABLE not in consoles
    assert "error: stopped by SIGTERM at step" in consoles
