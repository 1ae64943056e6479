"""Run dirs: readable names, created exclusively; `ckpt_path=last` resumes the run in hydra.run.dir, a new run never
writes over an older run's results, and a command rejected before training leaves no dir behind.

Imported before torch (Hydra instantiates RunDirGuard at start-up), so checkpoints.py is imported only inside functions.
"""

import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from autoencoders.cli import CommandCallback, created_run_dirs, user_error
from autoencoders.errors import UserError

if TYPE_CHECKING:
    import lightning as L


def run_name(overrides: Sequence[str], sweep_dir: str | None = None) -> str:
    """`_key-value` for each command-line override, sorted (the `run_name` resolver of conf/train.yaml's dirs).

    The name can be passed back on a command line unquoted: no `=`, `,`, `/` or spaces. A path-valued setting is named
    by its last part (a checkpoint by its run's folder), so it never nests folders; `ckpt_path` and hydra.* settings
    are left out. Past 200 characters, a hash of the whole name replaces the rest, so names stay distinct.

    A sweep job's name (`sweep_dir` given) leaves out the overrides that every job of the sweep shares: those of the
    sweep's command line, as its multirun.yaml records them, that sweep no values (`data=sprites`, not `model=ae,vae`).
    """
    shared = set()
    if sweep_dir is not None and (Path(sweep_dir) / "multirun.yaml").is_file():  # Hydra's basic sweeper writes it
        shared = set(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task)
    parts = []
    for override in sorted(set(overrides) - shared):
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key == "ckpt_path":
            continue
        path = Path(value.strip("'\""))
        if "/" in value:
            value = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
        sign = "-" if value.startswith("-") else ""  # seed=-1 is _seed--1, not seed=1's _seed-1
        parts.append(f"_{key}-{sign}{re.sub(r'[^A-Za-z0-9.+-]+', '-', value).strip('-')[:40]}")
    name = "".join(parts)
    if len(name) <= 200:
        return name
    return f"{name[:191]}_{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"  # short enough for any OS


def finished(run_dir: Path, mode: RunMode) -> bool:
    """Whether `run_dir` is a sweep job that an earlier run of the same sweep finished: it is skipped, untouched."""
    return mode == RunMode.MULTIRUN and (run_dir / "metrics.json").is_file()


def attempt_subdir(output_dir: str, mode: RunMode) -> str | None:
    """hydra.output_subdir: where Hydra saves an attempt's config and overrides. The first attempt's go to .hydra/,
    those of each later one (a resume, a rerun of a crashed sweep) to .hydra/attempt-<n>/, so the original command
    is never overwritten; a finished sweep job's nowhere."""
    run_dir = Path(output_dir)
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        return ".hydra"
    if finished(run_dir, mode):
        return None
    return f".hydra/attempt-{len(list((run_dir / '.hydra').glob('attempt-*'))) + 2}"


def job_log(output_dir: str, job_name: str, mode: RunMode) -> str:
    """The file Hydra's log handler appends to: <run>/<job name>.log (train.log; a DDP rank's own), or nothing for a
    finished sweep job."""
    return os.devnull if finished(Path(output_dir), mode) else str(Path(output_dir) / f"{job_name}.log")


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def checkpoint_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """`last` is the run dir's checkpoints/last.ckpt; any other value is a path, relative to where you run."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    if not last_checkpoint(run_dir).is_file():
        if (run_dir / ".hydra" / "config.yaml").is_file():
            raise UserError(
                f"ckpt_path=last resumes the run in hydra.run.dir, but {run_dir} holds no last.ckpt: its training "
                "stopped before it saved one. Start the run again there: the same command without ckpt_path."
            )
        raise UserError(
            f"ckpt_path=last resumes the run in hydra.run.dir, but {last_checkpoint(run_dir)} does not exist. Name "
            "the run to resume, with the overrides it was started with: python train.py <overrides> "
            "hydra.run.dir=outputs/runs/<run> ckpt_path=last."
        )
    return last_checkpoint(run_dir)


def resumes_in_place(ckpt_path: str | None, run_dir: Path) -> bool:
    """Whether `ckpt_path` continues the run in `run_dir` from its latest state."""
    return ckpt_path == "last" or (
        ckpt_path is not None and Path(ckpt_path).resolve() == last_checkpoint(run_dir).resolve()
    )


def check_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to train in a dir that holds a run's last.ckpt or metrics, unless resuming that run's last.ckpt (a run
    that stopped before its first last.ckpt can be started again in its dir)."""
    found = [path for path in (last_checkpoint(run_dir), run_dir / "metrics.json") if path.is_file()]
    if found and not resumes_in_place(ckpt_path, run_dir):
        raise UserError(
            f"{run_dir} already holds a run ({found[0].relative_to(run_dir)}), and a new run must not overwrite it. "
            "To continue that run, add ckpt_path=last; to start a new one, leave hydra.run.dir at its default (a new "
            "timestamped folder) or choose an unused one. Nothing was changed."
        )


def check_resume_settings(cfg: DictConfig, run_dir: Path) -> None:
    """Resuming in place must keep the run's model, data and augment settings and its weight average (a last.ckpt of
    +callbacks=ema holds the average as its weights): Hydra rewrites the run's .hydra/config.yaml."""
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)

    def settings(config: DictConfig, group: str) -> dict:  # {} for a group the config lacks (augment=none, no ema)
        node = OmegaConf.select(config, group)
        return OmegaConf.to_container(node, resolve=True) if node else {}

    changed = []
    for group in ("model", "data", "augment", "callbacks.ema"):
        old, new = settings(saved, group), settings(cfg, group)
        changed += [f"{group}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in {*old, *new} if old.get(k) != new.get(k)]
    if changed:
        raise UserError(
            f"Resuming {run_dir} with other model, data, augment or ema settings than it was trained with "
            f"({'; '.join(sorted(changed))}) would mix two runs in one folder. Resume with the run's own settings (see "
            f"{saved_file}), or train the new settings as a new run. Nothing was changed."
        )


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, model: "L.LightningModule") -> Path | None:
    """The checkpoint `fit` resumes from, checked to be readable (weights only), this project's, and to fit `model`."""
    from autoencoders.checkpoints import check_fits, read_checkpoint

    path = checkpoint_path(ckpt_path, run_dir)
    if path is not None:
        checkpoint = read_checkpoint(path)
        check_fits(checkpoint, model, path)
        if "optimizer_states" not in checkpoint:
            raise UserError(
                f"ckpt_path={path} holds only model weights (best-*.ckpt files are kept for testing and evaluation), "
                "so training cannot resume from it. Resume from the run's checkpoints/last.ckpt, or load the weights "
                "with autoencoders.load."
            )
    return path


def is_first_process() -> bool:
    """Whether this is rank 0 of its run (Lightning's DDP launcher and SLURM start the other ranks with the same
    run dir), read from the environment as Lightning reads it, before torch is imported."""
    return all(int(os.environ.get(key, 0)) == 0 for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}  # run dir -> the open file whose lock this process holds


def lock_run_dir(run_dir: Path) -> None:
    """Hold an OS lock (flock) on `run_dir` while this process trains in it; the OS releases it on any exit, SIGKILL
    included. A second process that would train in the same dir gets a UserError naming the PID that holds it."""
    if run_dir in _held_locks or not is_first_process():
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"Cannot write into the run dir {run_dir} ({e.strerror}). Make it writable, or train in "
                        "another folder.") from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use: process {holder} is training in it (it holds {path}). Wait for it to end, or "
            f"stop it (kill {holder}) before resuming; two processes training one run would overwrite each other's "
            "checkpoints."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[run_dir] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held_locks.pop(run_dir, None)
    if fd is not None:
        os.close(fd)  # closing the file releases its lock


MIN_FREE_BYTES = 1 << 20  # Hydra writes a run's config (about 20 KB) before any of this project's code can explain


def check_room(folder: Path) -> None:
    """Refuse to start writing into `folder` on a file system that is already full."""
    existing = next(parent for parent in [folder, *folder.parents] if parent.exists())
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"{folder} is on a full file system ({free} bytes free), so nothing could be written there. Free space "
            "on that disk, or write to one with room. Nothing was changed."
        )


def claim(run_dir: Path, chosen: bool) -> Path:
    """Create a new run's dir exclusively. A dir the user named is used if it is empty or holds a run that stopped
    before its first last.ckpt (started again); a default (timestamped) name that another run took in the same
    second gets a suffix, -2, -3, ..., so two runs never share a dir."""
    try:
        check_room(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (user_error(e) or e) from None
    for n in range(1, 1000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            if not chosen:
                continue
            if not run_dir.is_dir():
                raise UserError(
                    f"hydra.run.dir={run_dir} is a file, not a folder. Choose a new or empty folder, or leave "
                    "hydra.run.dir at its default (a new timestamped folder). Nothing was changed."
                ) from None
            started_before = (run_dir / ".hydra" / "config.yaml").is_file()  # and no last.ckpt: check_run_dir
            if is_first_process() and not started_before and any(run_dir.iterdir()):
                raise UserError(
                    f"hydra.run.dir={run_dir} is a folder that already holds files ({next(run_dir.iterdir()).name}, "
                    "...), and a new run must not write into them. Choose a new or empty folder, or leave "
                    "hydra.run.dir at its default (a new timestamped folder). Nothing was changed."
                ) from None
            return run_dir
        except OSError as e:
            raise (user_error(e) or e) from None
        created_run_dirs.append(candidate)
        return candidate
    raise UserError(f"Could not create a new run dir beside {run_dir}: 999 runs already have its name.")


class RunDirGuard(CommandCallback):
    """Hydra callback: checks a single run's dir before Hydra writes .hydra/ into it (train() checks sweep jobs), and
    creates a new run's dir exclusively."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        check_run_dir(run_dir, config.ckpt_path)
        if resumes_in_place(config.ckpt_path, run_dir):
            if not os.access(run_dir, os.W_OK):
                raise UserError(
                    f"{run_dir} is read-only, so the run cannot resume in it. Make it writable (chmod u+w), or "
                    "copy it and resume the copy with hydra.run.dir=<copy> ckpt_path=last."
                )
            check_resume_settings(config, run_dir)
            from autoencoders.checkpoints import read_checkpoint  # imports torch: only now that it is needed

            read_checkpoint(checkpoint_path(config.ckpt_path, run_dir))
            return
        chosen = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        claimed = claim(run_dir, chosen)
        with read_write(config.hydra.run), open_dict(config.hydra.run):
            config.hydra.run.dir = str(claimed)
