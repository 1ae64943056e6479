"""The file system is an input: a full disk, a read-only one or a folder of the user's ends a command with one
`error:` paragraph that names the path and the cause, exit code 2, no traceback and no half-written file; nothing of
the user's is replaced or removed (autoencoders/files.py's ledger, cli.user_error).

Full and read-only disks are real: small tmpfs mounts, which need root (CI runs the tests as root; elsewhere those
cases are skipped, saying why)."""

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from autoencoders.checkpoints import SafeCheckpointIO
from autoencoders.cli import FILE_SYSTEM_ERRORS, user_error
from autoencoders.errors import UserError
from autoencoders.files import LEDGER, check_replaceable, remove, replace_folder, write_json, write_text, written
from autoencoders.loggers import SWEEP_RECORD, record_sweep
from autoencoders.report import write_report
from autoencoders.transfer import Cell, plot, write_csv
from tests.helpers import run_script, run_train, snapshot

HALF_WRITTEN = ("*.tmp", "*.part", "*.old")
EVALUATE = ["k=2", "num_samples=0", "samplers=[prior]", "images.num_samples=4"]


@contextmanager
def tmpfs(folder: Path, size: str = "64m") -> Iterator[Path]:
    """A real, small file system mounted at `folder` for the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs the tests as root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its file system has no byte left."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError as e:
                assert e.errno == errno.ENOSPC


def half_written(folder: Path) -> list[Path]:
    return [p for pattern in HALF_WRITTEN for p in folder.rglob(pattern)] + list(folder.rglob(".*.part"))


def assert_one_error(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in named:
        assert text in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny AE run."""
    cwd = tmp_path_factory.mktemp("trained")
    run_train("model=ae", "latent_dim=2", f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    return cwd / "run"


# The cause, as the user reads it ------------------------------------------------------------------------------------
def torch_save_error(number: int) -> RuntimeError:
    """What torch.save raises when the file system refuses a write: a RuntimeError raised while handling the
    OSError, which names no file."""
    try:
        try:
            raise OSError(number, os.strerror(number))
        except OSError:
            raise RuntimeError("unexpected pos 1616192 vs 1616144")  # noqa: B904 (as torch's writer does)
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("number", sorted(FILE_SYSTEM_ERRORS), ids=lambda n: errno.errorcode[n])
def test_each_refusal_of_the_file_system_is_named_with_its_path_and_what_to_do(number, tmp_path):
    error = torch_save_error(number)
    assert user_error(ValueError("x")) is None
    said = str(user_error(error, tmp_path))  # no file named: the folder the command wrote into
    assert f"a file while writing into {tmp_path}" in said and errno.errorcode[number] in said
    assert FILE_SYSTEM_ERRORS[number] in said
    error.__context__.filename = str(tmp_path / "last.ckpt")
    assert f" {tmp_path / 'last.ckpt'}: {os.strerror(number)}" in str(user_error(error, tmp_path))


# The ledger: what the project may replace or remove ------------------------------------------------------------------
def test_the_ledger_lets_the_project_replace_and_remove_its_own_files_and_never_the_users(tmp_path):
    write_text(tmp_path / "summary.md", "the project's")
    write_text(tmp_path / "summary.md", "the project's, again")  # its own: replaced
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"notes.md is in the way.*Nothing was changed"):
        write_text(tmp_path / "notes.md", "the project's")
    remove(tmp_path / "notes.md")  # not its own: left
    assert (tmp_path / "notes.md").read_text() == "mine"

    for job in range(4):  # a transfer study's job list, then a study again with fewer jobs
        write_text(tmp_path / "jobs" / str(job), "run dir")
    for name in written(tmp_path / "jobs"):
        remove(tmp_path / "jobs" / name)
    write_text(tmp_path / "jobs" / "0", "run dir")
    assert written(tmp_path / "jobs") == {"0"} and sorted(os.listdir(tmp_path / "jobs")) == sorted(["0", LEDGER])

    evaluation = tmp_path / "eval" / "best_test"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.json").write_text("{}")
    replace_folder(tmp_path / "new", evaluation)
    (evaluation / "my_plot.png").write_text("mine")
    with pytest.raises(UserError, match="my_plot.png is in the way"):
        check_replaceable(evaluation)


def test_a_run_made_before_ledgers_is_the_projects_whole_and_a_users_folder_is_not(tmp_path):
    run = tmp_path / "run"  # as train.py wrote it before ledgers: nothing recorded
    (run / ".hydra").mkdir(parents=True)
    (run / "eval" / "best_test").mkdir(parents=True)
    for path in (run / "metrics.json", run / "failure.json", run / "eval" / "best_test" / "metrics.json"):
        path.write_text("{}")
    write_json(run / "metrics.json", {"x": 1.0})  # resumed: replaced
    remove(run / "failure.json")  # an earlier attempt's failure: removed
    check_replaceable(run / "eval" / "best_test")  # evaluated again: replaceable
    assert not (run / "failure.json").exists() and written(run) == {".hydra", "eval", "metrics.json"}

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="is in the way"):
        write_json(mine / "metrics.json", {"x": 1.0})


# Every writer on a full disk ----------------------------------------------------------------------------------------
def _checkpoint(folder: Path, trained: Path) -> None:
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 18)}}, folder / "last.ckpt")
    io.teardown()


CELLS = [Cell("frozen", 10, 3, 80.0, 1.0)]
ROWS = [{"run": "0", "model": "ae", "val/recon": 1.0, "status": "ok"}]
WRITERS: dict[str, Callable[[Path, Path], None]] = {  # (the folder to write into, a finished run)
    "metrics (files.write_json)": lambda folder, _: write_json(folder / "metrics.json", {"x": "v" * 100_000}),
    "checkpoint (SafeCheckpointIO)": _checkpoint,
    "sweep report (report.write_report)": lambda folder, _: write_report(folder, ROWS, "val/recon"),
    "transfer table (transfer.write_csv)": lambda folder, _: write_csv(CELLS * 2000, folder / "transfer.csv"),
    "transfer plot (transfer.plot)": lambda folder, _: plot(CELLS, folder / "transfer.png"),
    "sweep's TensorBoard record (loggers.record_sweep)": lambda folder, run: record_sweep(folder, [run]),
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_on_a_full_disk_raises_an_error_naming_its_file_and_leaves_nothing_half_written(
    writer, trained, tmp_path
):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        fill(disk)
        with pytest.raises(Exception) as raised:
            WRITERS[writer](disk, trained)
        said = str(user_error(raised.value, disk))
        assert "ENOSPC" in said and str(disk) in said, said
        assert sorted(p.name for p in disk.iterdir() if p.name != LEDGER) == ["filler"]


# The commands on a full or read-only disk ---------------------------------------------------------------------------
@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_one_error_and_starts_again_in_its_dir(tmp_path):
    with tmpfs(tmp_path / "disk", "6m") as disk:  # the best checkpoint fits, last.ckpt (with Adam's state) does not
        command = ["model=ae", "trainer.max_epochs=2", f"hydra.run.dir={disk / 'run'}"]
        proc = run_train(*command, cwd=tmp_path, check=False)
        assert_one_error(proc, f"Could not write {disk / 'run' / 'checkpoints' / 'last.ckpt'}", "ENOSPC")
        assert f"to start the run again there, run the same command with hydra.run.dir={disk / 'run'}" in proc.stderr
        assert not half_written(disk)
        assert "error: Could not write" in (disk / "run" / "train.log").read_text()

        remount(disk, "size=64m")  # space freed: the same command starts the run again in its dir
        run_train(*command, cwd=tmp_path)
        assert (disk / "run" / "metrics.json").is_file()
        assert sorted(p.name for p in (disk / "run" / "checkpoints").glob("*.ckpt")) == ["best-epoch001.ckpt",
                                                                                         "last.ckpt"]  # fmt: skip


@pytest.mark.slow
def test_training_into_a_read_only_folder_is_refused_naming_it(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        remount(disk, "ro")
        proc = run_train("model=ae", f"hydra.run.dir={disk / 'run'}", cwd=tmp_path, check=False)
        assert_one_error(proc, str(disk / "run"), "EROFS")


@pytest.mark.slow
@pytest.mark.parametrize("disk_state", ["full", "read-only"])
def test_evaluate_on_a_full_or_read_only_disk_says_so_and_leaves_no_part(disk_state, trained, tmp_path):
    with tmpfs(tmp_path / "disk", "64m") as disk:
        shutil.copytree(trained, disk / "run")
        before = snapshot(disk / "run")
        fill(disk) if disk_state == "full" else remount(disk, "ro")
        proc = run_script("evaluate.py", f"run_dir={disk / 'run'}", *EVALUATE, f"cache_dir={tmp_path / 'cache'}",
                          cwd=tmp_path, check=False)  # fmt: skip
        assert_one_error(proc, str(disk / "run" / "eval"), "ENOSPC" if disk_state == "full" else "EROFS")
        assert not half_written(disk) and snapshot(disk / "run") == before


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_train("model=ae", f"hydra.run.dir={tmp_path / 'notes.txt'}", cwd=tmp_path, check=False)
    assert_one_error(proc, f"hydra.run.dir={tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# Nothing of the user's is lost: a run and a user's file where each writer writes -----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target", ["a run dir", "a folder of the user's"])
def test_a_sweep_into_a_run_or_a_users_folder_is_refused_and_changes_nothing(target, trained, tmp_path):
    folder = tmp_path / "target"
    if target == "a run dir":
        shutil.copytree(trained, folder)
    else:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    proc = run_train("-m", "model=ae", "latent_dim=2", f"hydra.sweep.dir={folder}", cwd=tmp_path, check=False)
    assert_one_error(proc, f"hydra.sweep.dir={folder} holds")
    assert snapshot(folder) == before


@pytest.mark.slow
def test_a_users_files_in_a_sweep_its_runs_and_their_evaluations_are_never_changed(tmp_path):
    """The sweep dir (the sweep's record, the report), a run dir (a resume), the eval dir (an evaluation again), in a
    sweep made before ledgers."""
    sweep = tmp_path / "sweep"
    run_train("-m", "model=ae", "latent_dim=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    (job,) = [p for p in sweep.iterdir() if (p / "metrics.json").is_file()]
    evaluate = ["evaluate.py", *EVALUATE, f"cache_dir={tmp_path / 'cache'}"]
    run_script(*evaluate, f"run_dir={job}", cwd=tmp_path)
    for ledger in sweep.rglob(LEDGER):  # as a sweep made before ledgers: the project's own whole
        ledger.unlink()
    mine = [sweep / "notes.txt", job / "notes.txt", job / "eval" / "notes.txt"]
    for path in mine:
        path.write_text("mine")
    record = (sweep / SWEEP_RECORD).read_bytes()

    run_train("-m", "model=ae", "latent_dim=2", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert (sweep / SWEEP_RECORD).read_bytes() != record  # the sweep's own record is replaced, by its name
    run_train("model=ae", "latent_dim=2", "trainer.max_epochs=2", f"hydra.run.dir={job}", "ckpt_path=last",
              cwd=tmp_path)  # fmt: skip
    run_script(*evaluate, f"run_dir={job}", cwd=tmp_path)
    run_script(*evaluate, f"run_dir={job}", cwd=tmp_path)  # replaces its own evaluation
    assert all(path.read_text() == "mine" for path in mine)

    evaluation = max((p for p in (job / "eval").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    (evaluation / "my_plot.png").write_text("mine")  # inside an evaluation's folder: that one is not replaced
    before = snapshot(job)
    proc = run_script(*evaluate, f"run_dir={job}", cwd=tmp_path, check=False)
    assert_one_error(proc, f"{evaluation / 'my_plot.png'} is in the way")
    assert snapshot(job) == before
    (evaluation / "my_plot.png").unlink()

    (sweep / "summary.md").write_text("mine")  # a report's name: refused before any scoring
    before = snapshot(sweep)
    proc = run_script(*evaluate, f"sweep_dir={sweep}", cwd=tmp_path, check=False)
    assert_one_error(proc, f"{sweep / 'summary.md'} is in the way")
    assert "Scoring" not in proc.stderr and snapshot(sweep) == before
