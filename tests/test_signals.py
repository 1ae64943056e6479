"""Every command stops on Ctrl-C (SIGINT) and SIGTERM with one `error:` line naming the signal, exit code 130 or 143
(128 + the signal), no traceback and no half-written file (autoencoders/cli.py, stopped_by_signals). Each case runs
the real command in a subprocess and sends it a real signal once it has reached a known point."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from autoencoders.training import train
from tests.helpers import (
    ROOT,
    STOPPED_IMPORT_PATH,
    STOPPED_IMPORT_WAITING,
    STOPPED_IMPORTS,
    TINY,
    compose_train,
)

SIGNALS = {"INT": (signal.SIGINT, 130, "Ctrl-C (SIGINT)"), "TERM": (signal.SIGTERM, 143, "SIGTERM")}
HALF_WRITTEN = ("*.tmp", "*.part", "*.old", ".*.tmp", ".*.part", ".*.old")
PAUSED_AFTER_BUILD = """# train.py, paused for a minute once training.build has loaded the data and built the model
import runpy, sys, time
from autoencoders import training

built = training.build


def build(cfg):
    result = built(cfg)
    print("built: pausing", file=sys.stderr, flush=True)
    time.sleep(60)
    return result


training.build = build
sys.argv[0] = "{train_py}"
runpy.run_path("{train_py}", run_name="__main__")
"""


def stopped(
    script: Path, *args: str, cwd: Path, sent: signal.Signals, when: Callable[[str], bool], env: dict | None = None
) -> tuple[int, str]:
    """Run `script` with `args`, send it `sent` as soon as `when(its output so far)` holds, and return its exit code and
    stderr. Output is read by threads, so the check sees each line as it is written."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell that runs this suite in the background (`cmd &`, a CI job) makes its children
        # ignore SIGINT, and Python then installs no Ctrl-C handler at all
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = [
        threading.Thread(target=lambda name=name, stream=stream: out[name].extend(stream), daemon=True)
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 90
    while proc.poll() is None and not when("".join(out["stdout"] + out["stderr"])):
        assert time.monotonic() < deadline, "the command never reached the point to stop it at"
        time.sleep(0.05)
    assert proc.poll() is None, f"it finished before the signal:\n{''.join(out['stderr'])[-3000:]}"
    os.kill(proc.pid, sent)
    proc.wait(timeout=60)
    for reader in readers:
        reader.join(timeout=10)
    return proc.returncode, "".join(out["stderr"])


def assert_stopped_cleanly(code: int, err: str, expected: int, named: str, folder: Path) -> None:
    assert code == expected, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"error: stopped by {named}" in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not [p for pattern in HALF_WRITTEN for p in folder.rglob(pattern)]


@pytest.mark.parametrize("moment", ["starting", pytest.param("data loaded", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", SIGNALS)
def test_train_stopped_before_fit_says_so_in_one_line_and_leaves_no_run_dir(tmp_path, name, moment):
    """Stopped as it starts (Hydra has written its config; it imports torch), or once its data and model are built
    (held there by a pause): its run dir, whose training never started, is removed."""
    sent, expected, named = SIGNALS[name]
    run_dir = tmp_path / "run"
    script = ROOT / "train.py"
    if moment == "data loaded":
        script = tmp_path / "paused_train.py"
        script.write_text(PAUSED_AFTER_BUILD.format(train_py=ROOT / "train.py"))
    ready = {
        "starting": lambda _: (run_dir / ".hydra" / "config.yaml").is_file(),
        "data loaded": lambda output: "built: pausing" in output,
    }
    code, err = stopped(script, *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path, sent=sent, when=ready[moment])
    assert_stopped_cleanly(code, err, expected, named, tmp_path)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(where, marks=pytest.mark.slow) if where == "setting up training" else where
        for where in STOPPED_IMPORTS
    ],
)
def test_train_stopped_inside_an_import_that_makes_an_import_error_of_the_stop_still_says_it_was_stopped(
    tmp_path, where
):
    """SIGTERM's stop raised inside an extension module's import comes out of it as an ImportError (in train.py's
    imports, where an import check may swallow it, or as the job sets up training): still the one `error: stopped by
    SIGTERM` line, not the ImportError, nor a run that goes on."""
    overrides, env = STOPPED_IMPORTS[where]
    run_dir = tmp_path / "run"
    code, err = stopped(
        ROOT / "train.py", *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, sent=signal.SIGTERM,
        env={**STOPPED_IMPORT_PATH, **env}, when=lambda _: (tmp_path / STOPPED_IMPORT_WAITING).is_file(),
    )  # fmt: skip
    assert_stopped_cleanly(code, err, 143, "SIGTERM", tmp_path)
    assert "ImportError" not in err and not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", SIGNALS)
def test_train_stopped_during_fit_says_so_in_one_line(tmp_path, name):
    """Stopped in epoch 1 (its step 3 pauses 3 s), once epoch 0's checkpoint is saved: callbacks.Preemption reports
    the stop, and the command's own wrapper adds no second line."""
    sent, expected, named = SIGNALS[name]
    run_dir = tmp_path / "run"
    code, err = stopped(
        ROOT / "tests" / "faulty_train.py", *TINY, "trainer.max_epochs=1000", "checkpoint_every_s=0",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, sent=sent, env={"FAULT": "pause@3"},
        when=lambda _: any(run_dir.glob("checkpoints/*.ckpt")),
    )  # fmt: skip
    assert_stopped_cleanly(code, err, expected, named, tmp_path)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A VAE run dir, trained in this process (no .hydra/ in it: evaluate.py scores its checkpoint alone)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(run_dir, *TINY, "model=vae", "latent_dim=2"))
    return run_dir


@pytest.mark.parametrize("name", SIGNALS)
def test_evaluate_stopped_while_scoring_says_so_in_one_line_and_writes_nothing(trained, tmp_path, name):
    sent, expected, named = SIGNALS[name]
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    code, err = stopped(
        ROOT / "evaluate.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "data=mnist_subset", "k=100000",
        "num_samples=0", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path, sent=sent,
        when=lambda output: "nll: the IWAE bound" in output,  # k=100000: seconds of scoring after it
    )  # fmt: skip
    assert_stopped_cleanly(code, err, expected, named, trained)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before  # no evaluation folder, not even half


def test_evaluate_stopped_inside_an_import_that_makes_an_import_error_of_the_stop_still_says_it_was_stopped(
    trained, tmp_path
):
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    code, err = stopped(
        ROOT / "evaluate.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path, sent=signal.SIGTERM,
        env={**STOPPED_IMPORT_PATH, "STOPPED_IMPORT_IN": "autoencoders.evaluation"},
        when=lambda _: (tmp_path / STOPPED_IMPORT_WAITING).is_file(),
    )  # fmt: skip
    assert_stopped_cleanly(code, err, 143, "SIGTERM", trained)
    assert "ImportError" not in err
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


@pytest.mark.parametrize("name", SIGNALS)
def test_a_sweep_stopped_in_a_job_says_so_in_one_line_and_records_no_failure(tmp_path, name):
    """The stop ends the whole sweep (not only the job, which a sweep would record as failed and go on from)."""
    sent, expected, named = SIGNALS[name]
    sweep_dir = tmp_path / "sweep"
    code, err = stopped(
        ROOT / "train.py", "-m", *TINY, "model=ae,vae", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, sent=sent,
        when=lambda _: any(sweep_dir.glob("0*/.hydra/config.yaml")),
    )  # fmt: skip
    assert_stopped_cleanly(code, err, expected, named, tmp_path)
    assert not list(sweep_dir.rglob("failure.json")) and not list(sweep_dir.glob("1*"))  # the next job never started
