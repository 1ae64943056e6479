"""Every file the project writes beside the user's: written whole or not at all, and replacing or removing only files
that the project wrote.

A file is written to a temporary name in its folder and renamed over its target, so a crash, a full disk or a
parallel job never leaves or sees half a file. Each folder keeps a ledger (LEDGER) of the names written into it this
way: a name that exists but is not in it is the user's, and is neither replaced nor removed (a UserError says so).
A write that the file system refuses raises the OSError with the file's name in it (`cli.user_error` explains it to
the user).

Imported before torch (cli.py uses it), so torch is imported only inside functions."""

import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autoencoders.errors import UserError

LEDGER = ".autoencoders-files"  # in a folder: the names of the files and folders the project wrote into it
PROJECT_MARKERS = (".hydra", ".sweep_started")  # a run dir's, a sweep dir's


def written(folder: Path) -> set[str]:
    """The names the project wrote into `folder`, by its ledger. A folder of a run or sweep that the project made
    before it kept ledgers (a marker in it or up to two folders above: <run>/eval/<evaluation>) is taken as its own
    whole, as it was."""
    ledger = folder / LEDGER
    if ledger.is_file():
        return set(ledger.read_text().split("\n")) - {""}
    if folder.is_dir() and any((above / marker).exists() for above in [folder, *folder.parents][:3]
                               for marker in PROJECT_MARKERS):  # fmt: skip
        return set(os.listdir(folder)) - {LEDGER}
    return set()


@contextmanager
def _ledger(folder: Path) -> Iterator[set[str]]:
    """The ledger's names, to change in the block, locked against the other processes that record into the folder
    (parallel sweep jobs: the transfer study's job list)."""
    new = not (folder / LEDGER).is_file()
    adopted = written(folder) if new else set()  # what a folder made before ledgers holds
    with open(folder / LEDGER, "a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        ledger.seek(0)
        names = set(ledger.read().split("\n")) - {""}
        before = None if new else set(names)
        names |= adopted
        yield names
        if names != before:
            ledger.truncate(0)
            ledger.write("".join(f"{name}\n" for name in sorted(names)))


def record(path: Path) -> None:
    """Add `path` to its folder's ledger: a file the project writes (and may replace or remove). The first record in
    a folder made before ledgers starts its ledger from what the folder holds."""
    if path.name not in written(path.parent) or not (path.parent / LEDGER).is_file():
        with _ledger(path.parent) as names:
            names.add(path.name)


def remove(path: Path) -> None:
    """Remove `path`, and its name from the ledger, if the project wrote it (an older report's plot that has nothing
    to show now, an earlier attempt's failure record)."""
    if path.name in written(path.parent):
        with _ledger(path.parent) as names:
            path.unlink(missing_ok=True)
            names.discard(path.name)


def check_replaceable(*paths: Path) -> None:
    """Refuse to replace or remove any of `paths` that exists and that the project did not write (called for all the
    files of a report at once, so that none is written if one is in the way); a folder, also when it holds anything
    that the project did not write."""
    for path in paths:
        if (path.exists() or path.is_symlink()) and path.name not in written(path.parent):
            raise UserError(
                f"{path} is in the way: autoencoders would write its own {path.name} there, and it did not write "
                "what is there now, so that is left as it is. Move it elsewhere (or choose another folder) and run "
                "the command again. Nothing was changed."
            )
        if path.is_dir() and not path.is_symlink():
            check_replaceable(*(path / name for name in sorted(set(os.listdir(path)) - {LEDGER})))


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the exceptions behind it: each one's cause, or else the one it was raised while handling."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def name_in_error(error: BaseException, path: Path) -> None:
    """Give the OSError behind `error` (e.g. torch.save's RuntimeError on a full disk) the name of the file written."""
    for link in exception_chain(error):
        if isinstance(link, OSError) and link.filename is None:
            link.filename = str(path)


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; once the block ends it becomes `path`, replacing only a file
    the project wrote, and on any error it is removed."""
    check_replaceable(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record(path)  # before the temporary file exists, and a ledger that cannot be written changes nothing
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        name_in_error(e, path)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


def replace_folder(new: Path, target: Path) -> None:
    """Give the folder `new`, whose every file the project just wrote, the name `target`. An older `target` must hold
    only files the project wrote (else a UserError names one and nothing changes); it is deleted once the new one is
    in place."""
    for child in new.iterdir():
        record(child)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    record(target)
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_cache(obj: object, path: Path, what: str) -> None:
    """torch.save `obj` atomically. A cache that cannot be written only costs time, hence a warning, not an error.
    Its name is a hash of what it holds, so no other file has it: caches keep no ledger."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a cache's name is a hash of what it holds: no ledger
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk: a RuntimeError from the OSError
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"Could not cache {what} in {path.parent} ({e}); it will be made again next time. "
            "Set $AUTOENCODERS_CACHE (or the cache_dir setting) to a writable folder.",
            stacklevel=3,
        )
