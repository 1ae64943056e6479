"""Faults and bad input: a killed run resumes exactly, NaN stops cleanly, failed sweep jobs are listed, and bad input
is refused with a clear message while every existing run dir and checkpoint stays as it was."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra._internal.callbacks import Callbacks
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import autoencoders
from autoencoders.checkpoints import SafeCheckpointIO, all_finite
from autoencoders.cli import CommandCallback, user_error
from autoencoders.errors import UserError
from autoencoders.files import LEDGER
from autoencoders.models import M2
from autoencoders.training import train
from tests.faulty_train import PAUSE_S, Fault
from tests.helpers import ROOT, TINY, checkpoint_file, compose_train, metrics, run_train, snapshot

# 2 epochs of 2 small batches, with deterministic CPU kernels so that two runs can be compared exactly.
RUN = ["model=vae", "latent_dim=2", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.accelerator=cpu",
       "+trainer.deterministic=true"]  # fmt: skip


def start(script: Path, *overrides: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), *overrides],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One 4-epoch run (2 steps each) that was never interrupted, and the same run SIGKILLed in its last epoch (at
    global step 7), with last.ckpt at most every PAUSE_S seconds: a pause in epoch 1 makes its end write one, and
    epoch 2's end state is only held in memory when the kill comes."""
    root = tmp_path_factory.mktemp("runs")
    whole, killed = root / "whole", root / "killed"
    timed = [*RUN, "trainer.max_epochs=4", f"checkpoint_every_s={PAUSE_S}"]
    procs = [
        start(ROOT / "train.py", *timed, f"hydra.run.dir={whole}", cwd=root, env={}),
        start(
            ROOT / "tests" / "faulty_train.py",
            *timed,
            f"hydra.run.dir={killed}",
            cwd=root,
            env={"FAULT": "pause@3 kill@7"},
        ),  # fmt: skip
    ]
    (_, err), _ = procs[0].communicate(), procs[1].communicate()
    assert procs[0].returncode == 0, err[-3000:]
    assert procs[1].returncode == -9  # SIGKILL
    return {"whole": whole, "killed": killed}


def test_a_run_killed_between_timed_checkpoints_resumes_from_the_older_one_and_ends_like_an_uninterrupted_one(runs):
    killed = runs["killed"]
    last = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)  # epoch 2's end was held, not written, when the kill came
    assert not (killed / "metrics.json").exists()
    # the best checkpoint that this last.ckpt names is on disk and loads: the run can still test it
    (best,) = [state for key, state in last["callbacks"].items() if key.startswith("BestCheckpoint")]
    assert Path(best["best_model_path"]).is_file() and autoencoders.load(best["best_model_path"])

    first_log = (killed / "train.log").read_text()
    original = {p.name: p.read_bytes() for p in (killed / ".hydra").glob("*.yaml")}
    run_train(*RUN, "trainer.max_epochs=4", f"hydra.run.dir={killed}", "ckpt_path=last", cwd=killed.parent, tiny=False)
    assert metrics(killed) == pytest.approx(metrics(runs["whole"]), rel=1e-6)
    # the resume kept the history: the first attempt's command and config, and its log, which was appended to
    assert {p.name: p.read_bytes() for p in (killed / ".hydra").glob("*.yaml")} == original
    assert "ckpt_path=last" in (killed / ".hydra" / "attempt-2" / "overrides.yaml").read_text()
    assert (killed / "train.log").read_text().startswith(first_log) and "Run dir:" in (killed / "train.log").read_text()


@pytest.mark.parametrize(
    ("sent", "code", "named"),
    [("term", 143, "SIGTERM"), ("int", 130, "Ctrl-C (SIGINT)")],
    ids=["TERM", "INT"],
)
def test_a_signal_stops_with_128_plus_its_number_writing_the_last_finished_epoch(tmp_path, sent, code, named):
    """SIGTERM, as SLURM sends before preemption, or Ctrl-C, in epoch 2 or later of a run whose last.ckpt was not due
    yet: the run writes the last finished epoch's end state, names it, and does not report success."""
    run_dir = tmp_path / "run"
    proc = start(
        ROOT / "tests" / "faulty_train.py", *TINY, "trainer.max_epochs=1000", "checkpoint_every_s=3600",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"FAULT": f"{sent}@5"},
    )  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    stopped = re.search(rf"error: stopped by {re.escape(named)} at step \d+ \(epoch (\d+)\)", err)
    assert stopped and f"resume it with ckpt_path=last hydra.run.dir={run_dir}" in err
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == int(stopped[1]) - 1 >= 1 and not (run_dir / "metrics.json").exists()


class SendsASignal:
    """Pickled inside torch.save, it signals this process: as a Ctrl-C or SIGTERM in the middle of a checkpoint."""

    def __init__(self, sent: signal.Signals) -> None:
        self.sent = sent

    def __reduce__(self):
        os.kill(os.getpid(), self.sent)
        return int, (7,)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_during_a_checkpoint_write_arrives_after_it_and_the_checkpoint_is_whole(tmp_path, sent):
    class Stopped(Exception):  # what Python's Ctrl-C handler and Lightning's SIGTERM stop do: raise in the main thread
        pass

    def stop(number: int, frame: object) -> None:
        raise Stopped(number)

    previous = signal.signal(sent, stop)
    io = SafeCheckpointIO()
    try:
        with pytest.raises(Stopped):  # delivered, once the write is done: not lost, and not inside torch.save
            io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "x": SendsASignal(sent)}, tmp_path / "last.ckpt")
    finally:
        signal.signal(sent, previous)
        io.teardown()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)  # the test's own file: int(7) is a global
    assert saved["x"] == 7 and torch.equal(saved["state_dict"]["w"], torch.ones(3))


def test_last_ckpt_is_the_latest_epoch_at_the_end_of_fit_even_when_val_loss_stops_improving(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["model=ae", "optimizer.lr=1e-30", "trainer.max_epochs=3", "checkpoint_every_s=3600"]
    train(compose_train(run_dir, *TINY, *overrides))  # no step moves a weight; no last.ckpt is due before the end
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2


def test_nan_loss_stops_naming_the_step_and_writes_the_last_good_epoch(runs, tmp_path):
    """NaN in epoch 5 of a resumed run whose last.ckpt was not due: epoch 4's end state, held in memory, is written."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["whole"], run_dir)
    cfg = compose_train(run_dir, *RUN, "trainer.max_epochs=6", "checkpoint_every_s=3600", "ckpt_path=last")
    last = run_dir / "checkpoints" / "last.ckpt"
    kept = rf"the last good checkpoint, {re.escape(str(last))}, is kept"
    with pytest.raises(UserError, match=rf"loss became non-finite \(loss = nan\) at step 11 \(epoch 5\).*{kept}"):
        train(cfg, [Fault("nan", 11)])
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (4, 10) and all_finite(state["state_dict"].values())


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_under_a_weight_average_the_best_checkpoint_holds_the_average_that_was_validated_and_chosen(tmp_path):
    """+callbacks=ema validates the average; one validation, at the end, so the best and the last checkpoint are of
    one step: the best (weights only) must hold what last.ckpt's state_dict holds, the average, and not the current
    weights, which last.ckpt keeps for resuming."""
    run_train("model=vae", "latent_dim=2", "+callbacks=ema", "callbacks.ema.decay=0.5", "hydra.run.dir=run",
              cwd=tmp_path)  # fmt: skip
    checkpoints = tmp_path / "run" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    best, last = (torch.load(p, map_location="cpu", weights_only=True) for p in (best, checkpoints / "last.ckpt"))
    assert best["global_step"] == last["global_step"] == 2
    assert "current_model_state" not in best and "averaging_state" not in best
    for name, weights in best["state_dict"].items():
        assert torch.equal(weights, last["state_dict"][name]), name
    assert any(not torch.equal(w, last["current_model_state"][k]) for k, w in best["state_dict"].items())


def test_checkpoint_writes_are_atomic_finite_and_read_back_weights_only(tmp_path, monkeypatch):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def killed_mid_write(obj, f) -> None:
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise KeyboardInterrupt  # as a kill would, after part of the file is written

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}}, path)  # over the old file and the torn part
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", LEDGER])  # no torn part left

    with pytest.raises(UserError, match="NaN or Inf"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((3,), 2.0))

    assert zipfile.ZipFile(path).testzip() is None  # each record carries its CRC32, and it is right

    torch.save({"state_dict": {}, "hparams": Namespace(lr=1)}, tmp_path / "pickled.ckpt")  # as old Lightning did
    with pytest.raises(Exception, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")


def test_a_checkpoint_is_on_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """Power-cut safety: the new file is fsynced before it takes the target's name, and the rename is fsynced after."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    io.teardown()  # as Lightning's strategy does at the end of fit: waits for the save in flight
    assert events == [("fsync", str(tmp_path / ".last.ckpt.part")), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert (tmp_path / LEDGER).read_text() == "last.ckpt\n"  # recorded as the project's once durable


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_rerunning_a_crashed_sweep_skips_finished_jobs_untouched_and_resumes_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", "model=ae,vae", "latent_dim=2", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}"]
    run_train(*command, cwd=tmp_path)
    done, crashed = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    (crashed / "metrics.json").unlink()  # as if the job had been killed after its last epoch's checkpoint
    before = snapshot(done)
    proc = run_train(*command, cwd=tmp_path)
    assert snapshot(done) == before  # byte for byte: .hydra, train.log, checkpoints, events, metrics.json
    assert (crashed / "metrics.json").is_file() and (crashed / ".hydra" / "attempt-2" / "config.yaml").is_file()
    assert not list(sweep.glob("*/failure.json"))
    skipped = "1 job(s) had finished in an earlier invocation of the sweep, their files left as they were"
    assert f"{skipped} ({done.name}); 1 job(s) ran to the end now." in proc.stdout
    last = crashed / "checkpoints" / "last.ckpt"
    assert f"stopped in an earlier run of this sweep: resuming it from {last}" in (crashed / "train.log").read_text()


def test_failed_sweep_jobs_do_not_stop_the_others_and_are_listed_at_the_end(tmp_path):
    # latent_dim=0 fails its config check; the 2-process DDP job is refused inside -m (Lightning would re-run the
    # sweep in each process); the remaining job trains.
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "trainer=ddp", "trainer.devices=2,1", "latent_dim=0,2", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 1
    summary = proc.stderr[proc.stderr.index("error: 3 job(s) of the sweep") :]
    assert summary.count("latent_dim=0 is not positive") == 2
    assert "A 2-process DDP run cannot start inside a sweep (-m)" in summary
    finished = [p.name for p in sweep.iterdir() if (p / "metrics.json").is_file()]
    assert len(finished) == 1 and "latent_dim-2" in finished[0] and "devices-1" in finished[0]
    assert len(list(sweep.glob("*/failure.json"))) == 3


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def bad_checkpoint(kind: str, tmp_path: Path, good: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    return path


# (overrides, expected message). {ckpt}, {best}: the finished run's last.ckpt and best-*.ckpt; {bad:<kind>}: a broken
# file (bad_checkpoint); {run}: the finished run's dir; {folder:<kind>}: an image folder that is empty, holds only a
# corrupt image, or a 3x32x32 one for a data-shape mismatch; {file}: a text file; {m2}: an M2 checkpoint.
BAD_INPUT = {
    "validation never runs": (
        [
            "trainer.max_epochs=-1",
            "+trainer.max_steps=20",
            "+trainer.val_check_interval=100",
            "+trainer.check_val_every_n_epoch=null",
        ],
        r"trainer\.max_steps=20 ends before the first validation at trainer\.val_check_interval=100.*Raise "
        r"trainer\.max_steps or lower trainer\.val_check_interval",
    ),
    "empty image folder": (["data=image_folder", "data.source.root={folder:empty}"], "holds no image files"),
    "only a corrupt image": (["data=image_folder", "data.source.root={folder:corrupt}"], "could be read"),
    "missing dataset": (["data=mnist", "data.source.root={folder:empty}"], "data.source.download=true"),
    "missing ckpt_path": (["ckpt_path={bad:missing}"], "does not exist"),
    "ckpt_path a folder": (["ckpt_path={run}"], "is a folder, not a checkpoint file; it holds checkpoints/"),
    "truncated ckpt_path": (["ckpt_path={bad:truncated}"], "is not a readable checkpoint"),
    "ckpt_path not a checkpoint": (["ckpt_path={bad:text}"], "is not a readable checkpoint"),
    "ckpt_path not ours": (["ckpt_path={bad:foreign}"], "not a checkpoint written by this project"),
    "missing encoder_ckpt": (["model=classifier", "encoder_ckpt={bad:missing}"], "does not exist"),
    "truncated encoder_ckpt": (["model=classifier", "encoder_ckpt={bad:truncated}"], "is not a readable checkpoint"),
    "encoder_ckpt not a checkpoint": (["model=classifier", "encoder_ckpt={bad:text}"], "is not a readable checkpoint"),
    "ckpt of another latent_dim": (["latent_dim=3", "ckpt_path={ckpt}"], r"latent_dim=2 \(this run: 3\)"),
    "ckpt of another model": (["model=ae", "ckpt_path={ckpt}"], "holds a VAE whose weights do not fit this run's AE"),
    "ckpt of another data shape": (
        [
            "data=image_folder",
            "data.source.root={folder:rgb32}",
            "data.source.channels=3",
            "data.source.image_size=32",
            "ckpt_path={ckpt}",
        ],
        r"image_shape=\[1, 28, 28\] \(this run: \[3, 32, 32\]\)",
    ),  # fmt: skip
    "ckpt_path a best (weights-only) ckpt": (["latent_dim=2", "ckpt_path={best}"], "holds only model weights"),
    "ckpt_path=last, nothing to resume": (["ckpt_path=last"], "last.ckpt does not exist"),
    "new run in a finished run's dir": (["hydra.runtime.output_dir={run}"], "already holds a run"),
    "bernoulli on grey images": (["data.binarize=null", "model.likelihood=bernoulli"], "data.binarize=dynamic"),
    "unknown likelihood": (["model.likelihood=mse"], "model.likelihood=mse is unknown"),
    "unknown binarize": (["data.binarize=yes"], "data.binarize=yes is unknown"),
    "frozen classifier without encoder": (["model=classifier", "model.method=frozen"], "needs a pretrained encoder"),
    "classifier method unknown": (["model=classifier", "model.method=svm"], "model.method=svm is unknown"),
    "knn augmented": (
        ["model=classifier", "model.method=knn", "encoder_ckpt={ckpt}", "augment=affine"],
        "model.method=knn stores the codes",
    ),
    "knn averaged": (
        ["model=classifier", "model.method=knn", "encoder_ckpt={ckpt}", "+callbacks=ema"],
        "model.method=knn stores the codes",
    ),
    "consistency without augment": (["model=m2", "model.consistency=1"], "needs augment=affine"),
    "compiled RAE-GP": (["model=rae_gp", "compile=true"], "compile=true cannot train model.decoder_penalty=gradient"),
    "negative latent_dim": (["latent_dim=-4"], "latent_dim=-4 is negative. Use an integer > 0"),
    "negative kl_weight": (["kl_weight=-1"], r"kl_weight=-1\.0 is negative. Use a weight >= 0"),
    "kl_weight nan": (["kl_weight=nan"], "kl_weight=nan is not finite. Use a weight >= 0"),
    "negative checkpoint_every_s": (["checkpoint_every_s=-1"], r"checkpoint_every_s=-1\.0 is negative"),
    "kl_weight inf": (["kl_weight=inf"], "kl_weight=inf is not finite"),
    "negative seed": (["seed=-1"], r"seed=-1 is negative. Use an integer in \[0, 2\*\*32\)"),
    "seed past 2**32": (["seed=4294967296"], "seed=4294967296 is too large"),
    "unknown model key": (["+model.foo=1"], "The model settings could not be built: .*foo"),
    "unknown data key": (["+data.foo=1"], "The data settings could not be built: .*foo"),
    "unknown accelerator": (["trainer.accelerator=banana"], "The trainer settings could not be built: .*banana"),
    "encoder_ckpt of a non-classifier": (["encoder_ckpt={ckpt}"], "is read only by model=classifier"),
    "classifier latent_dim that contradicts its encoder": (
        ["model=classifier", "encoder_ckpt={ckpt}", "latent_dim=8"],
        r"model.latent_dim=8 \(the checkpoint's: 2\)",
    ),
    "gaussian on binarised images": (["model.likelihood=gaussian"], "gaussian is a density of intensities"),
    "continuous Bernoulli on binarised images": (
        ["model.likelihood=continuous_bernoulli"],
        "continuous_bernoulli is a density of intensities",
    ),
    "no image epochs": (["images_every_n_epochs=0"], "images_every_n_epochs=0 is not positive"),
    "negative learning rate": (["optimizer.lr=-1"], "optimizer.lr=-1 is negative. Use a learning rate > 0"),
    "learning rate not a number": (["optimizer.lr=abc"], "optimizer.lr=abc is not a number"),
    "endless training": (["trainer.max_epochs=-1"], "would train forever"),
    "no epochs": (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not positive"),
    "a zero-width layer": (["model.widths=[0]"], r"model.widths=\[0\] holds 0, which is not positive"),
    "negative KL warm-up": (["model.kl_warmup_epochs=-5"], "model.kl_warmup_epochs=-5 is negative"),
    "negative sparsity": (["model=sparse_ae", "model.sparsity=-1"], r"model.sparsity=-1(\.0)? is negative"),
    "unknown selection": (["selection=best"], "selection=best is unknown. Use one of small_val"),
    "val_labels_per_class 0": (["data.val_labels_per_class=0"], "data.val_labels_per_class=0 is not positive"),
    "tokens that do not divide the code": (["model=vqvae", "latent_dim=6"], "model.embedding_dim=4 does not divide"),
    "unknown corruption": (["model=dae", "model.corruption=blur"], "model.corruption=blur is unknown"),
    "masking beyond 1": (["model=dae", "model.corruption=masking", "model.noise=1.5"], "model.noise=1.5 is no masking"),
    "negative MMD weight": (["model=wae", "model.mmd_weight=-1"], r"model.mmd_weight=-1(\.0)? is negative"),
    "no importance samples": (["model=iwae", "model.k=0"], "model.k=0 is not positive"),
    "zero TC weight": (["model=beta_tcvae", "model.tc_weight=0"], r"model.tc_weight=0\.0 is not positive"),
    "a one-vector codebook": (["model=vqvae", "model.codebook_size=1"], "model.codebook_size=1 is too small"),
    "a classifier that contradicts its encoder": (
        ["model=classifier", "encoder_ckpt={ckpt}", "model.arch=conv"],
        r"model.arch=conv \(the checkpoint's: mlp\)",
    ),
    "image folder root is a file": (["data=image_folder", "data.source.root={file}"], "is a file, not a folder"),
    "negative device cap": (["data.device_cap_gb=-1"], r"data.device_cap_gb=-1\.0 is negative"),
    "a NaN check that never runs": (["callbacks.nan_guard.every_n_steps=-1"], "every_n_steps=-1 must be"),
    **(
        {}
        if torch.cuda.is_available()
        else {
            "trainer=gpu without a GPU": (["trainer=gpu", "trainer.accelerator=gpu"], "PyTorch sees no CUDA GPU here")
        }
    ),
    "probe_labels_per_class 0": (["data.probe_labels_per_class=0"], "data.probe_labels_per_class=0 is not positive"),
    "no k-NN neighbours": (
        ["model=classifier", "model.method=knn", "model.knn_k=0"],
        "model.knn_k=0 is not positive",
    ),
    "negative M2 alpha": (["model=m2", "model.alpha=-1"], r"model.alpha=-1\.0 is negative"),
    "M1+M2 on a VAE of another split": (
        ["model=m2", "encoder_ckpt={ckpt}", "data.split_seed=1"],
        "trained on .* of the classifier's validation and test images",
    ),
    "encoder of another split": (
        ["model=classifier", "encoder_ckpt={ckpt}", "data.split_seed=1"],
        "trained on .* of the classifier's validation and test images",
    ),
    "unknown KL schedule": (["model.kl_schedule=cosine"], "model.kl_schedule=cosine is unknown"),
    "FSQ with one level": (["model=fsq", "model.levels=1"], "model.levels=1 is too small. Use an integer >= 2"),
    "unknown VQ codebook start": (["model=vqvae", "model.codebook_init=zeros"], "model.codebook_init=zeros is unknown"),
    "sprites too small for their shapes": (["data=sprites", "data.source.image_size=8"], "image_size=8 is too small"),
    "FSQ levels its code prior cannot serve": (
        ["model=fsq", "model.levels=100000"],
        "model.levels=100000 with latent_dim=16 is more than the code prior",
    ),
    "FSQ code too large for its prior": (
        ["model=fsq", "latent_dim=64", "model.levels=65"],
        "model.levels=65 with latent_dim=64 is more than the code prior",
    ),
    "classifier on an M2 checkpoint": (["model=classifier", "encoder_ckpt={m2}"], "is a semi-supervised M2 checkpoint"),
    "M1+M2 on an M2 checkpoint": (["model=m2", "encoder_ckpt={m2}"], "is a semi-supervised M2 checkpoint"),
    "compiled Hamiltonian VAE": (["model=hamiltonian_vae", "compile=true"], "compile=true cannot train model.leapfrog"),
    "leapfrog step past its bound": (
        ["model=hamiltonian_vae", "model.step_size=0.6"],
        r"model.step_size=0\.6 is not below model.max_step_size=0\.5",
    ),
    "MS-SSIM scales the images cannot hold": (
        ["model=msssim_vae", "model.scales=5"],
        "model.scales=5 scales with a 7-pixel window .* does not fit 28x28 images",
    ),
    "a hyperspherical code of one number": (["model=svae", "latent_dim=1"], "model.latent_dim=1 is too small"),
    "PIWAE without bounds": (["model=piwae", "model.m=0"], "model.m=0 is not positive"),
    "VAE-GAN with a negative gamma": (["model=vae_gan", "model.gamma=-1"], r"model.gamma=-1\.0 is negative"),
    "16-mixed precision on a CPU": (
        ["+trainer.precision=16-mixed", "model=factor_vae", "trainer.accelerator=cpu"],
        r"trainer\.precision=16-mixed .*bf16-mixed",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_and_changes_nothing(case, runs, tmp_path):
    finished = runs["whole"]
    folders = {"empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt", "rgb32": tmp_path / "rgb32"}
    folders["empty"].mkdir()
    folders["corrupt"].mkdir()
    (folders["corrupt"] / "broken.png").write_bytes(b"\x89PNG garbage")
    write_images(folders["rgb32"], [(32, 32)] * 20)
    good = finished / "checkpoints" / "last.ckpt"
    best = next((finished / "checkpoints").glob("best-*.ckpt"))
    (tmp_path / "notes.txt").write_text("not a folder")
    fill = {"{ckpt}": str(good), "{best}": str(best), "{run}": str(finished), "{file}": str(tmp_path / "notes.txt")}
    fill["{m2}"] = str(checkpoint_file(M2((1, 28, 28), num_classes=10, latent_dim=2), tmp_path / "m2.ckpt"))
    fill |= {
        f"{{bad:{k}}}": str(bad_checkpoint(k, tmp_path, good)) for k in ("missing", "truncated", "text", "foreign")
    }
    fill |= {f"{{folder:{k}}}": str(v) for k, v in folders.items()}
    overrides, message = BAD_INPUT[case]
    for key, value in fill.items():
        overrides = [o.replace(key, value) for o in overrides]
    before = snapshot(finished)

    cfg = compose_train(tmp_path / "run", *TINY, *overrides)
    with warnings.catch_warnings(record=True), pytest.raises(Exception) as raised:
        train(cfg)
    assert re.search(message, str(user_error(raised.value)))  # what train.py prints after "error: "
    assert snapshot(finished) == before
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupt_and_odd_sized_images_are_skipped_or_resized_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, [(20 + i % 7, 30 - i % 5) for i in range(20)])  # 20 sizes, all resized to 28x28
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = compose_train(tmp_path / "run", *TINY, "data=image_folder", f"data.source.root={folder}", "latent_dim=2")
    with pytest.warns(UserWarning, match="Skipping unreadable image .*broken.png"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "overrides,truncate_last,message",
    [
        (["trainer.max_epochs=5"], False, "already holds a run"),
        (["latent_dim=3", "ckpt_path=last"], False, r"other model, data, augment or ema settings .*latent_dim: 2 -> 3"),
        (["augment=affine", "ckpt_path=last"], False, r"augment._target_: None -> 'autoencoders.data.augment.Affine'"),
        (["+callbacks=ema", "ckpt_path=last"], False, r"callbacks.ema.decay: None -> 0.999"),
        (["ckpt_path=last"], True, "is not a readable checkpoint"),
    ],
    ids=[
        "new run in a used dir",
        "resume with other settings",
        "resume augmented",
        "resume averaged",
        "resume a truncated last.ckpt",
    ],  # fmt: skip
)
def test_train_py_refuses_before_writing_into_an_existing_run_dir(overrides, truncate_last, message, runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["whole"], run_dir)
    if truncate_last:
        last = run_dir / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[:1000])
    before = snapshot(run_dir)
    proc = run_train(*RUN, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False, tiny=False)
    assert proc.returncode == 2
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr)
    assert snapshot(run_dir) == before  # not even .hydra/ or train.log


@pytest.mark.parametrize("config", ["train.yaml", "experiment/transfer.yaml"])
def test_every_hydra_callback_of_the_project_is_a_command_callback(config):
    """Hydra turns a callback's exception into a warning and exits 0; the project's callbacks end the command."""
    callbacks = OmegaConf.load(ROOT / "conf" / config).hydra.callbacks
    assert callbacks
    for name, node in callbacks.items():
        assert issubclass(get_class(node._target_), CommandCallback), name


class Failing(CommandCallback):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error, code, said, traceback",
    [
        (UserError("latent_dim=0 is not positive."), 2, "error: latent_dim=0 is not positive.\n", False),
        (OSError(errno.ENOSPC, "No space left on device", "/full/metrics.json"), 2,
         "error: Could not write /full/metrics.json: No space left on device (ENOSPC). Free space", False),
        (KeyError("seed"), 1, "error: Failing.on_multirun_end failed with the traceback above: KeyError: 'seed'", True),
    ],
    ids=["bad input", "full disk", "fault"],
)  # fmt: skip
def test_a_failing_hydra_callback_ends_the_command_through_hydras_own_dispatch(error, code, said, traceback, capsys):
    callbacks = Callbacks()
    callbacks.callbacks.append(Failing(error))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Hydra's warning would mean the failure was swallowed
        with pytest.raises(SystemExit) as ended:
            callbacks.on_multirun_end(config=OmegaConf.create())
    exit_code, stderr = ended.value.code, capsys.readouterr().err
    if isinstance(exit_code, str):  # sys.exit(message): Python prints the message to stderr and exits 1
        exit_code, stderr = 1, stderr + exit_code
    assert exit_code == code
    assert said in stderr and ("Traceback (most recent call last)" in stderr) == traceback
