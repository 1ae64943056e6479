"""How a command ends on bad input or a failed sweep job: one `error:` paragraph on stderr and exit code 2 (no
traceback, and no run dir left behind by a rejected command), or a failure record that lets the sweep go on; and how
it ends on Ctrl-C or SIGTERM: one `error:` line, exit code 130 or 143 (stopped_by_signals).

Imported before torch (train.py's Hydra callbacks use it at start-up)."""

import errno
import functools
import logging
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from autoencoders.errors import EveryProcessError, FileSystemError, UserError
from autoencoders.files import exception_chain, write_json

log = logging.getLogger(__name__)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}  # as callbacks.Preemption names them

FAILURE_FILE = "failure.json"  # in a failed sweep job's dir
created_run_dirs: list[Path] = []  # the run dir that this process created (rundirs.claim), if any
training_started: list[Path] = []  # the run dirs whose training began in this process: kept whatever happens next


def exit_with(error: UserError) -> NoReturn:
    """How a single run ends on bad input: the message as one paragraph on stderr, exit code 2 (an error that every
    DDP process raises: on rank 0's stderr, and in the other processes' logs)."""
    if isinstance(error, EveryProcessError):
        from lightning.pytorch.utilities import rank_zero_only  # loaded already: such errors come from training

        if rank_zero_only.rank != 0:
            log.error("error: %s", error)
            sys.exit(2)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def refuse_unreadable_overrides(arguments: list[str]) -> None:
    """Refuse, before Hydra parses them, command-line overrides that Hydra's grammar cannot read (a value with spaces,
    non-ASCII letters or its syntax characters, unquoted): Hydra's own error is a lexer exception that says nothing of
    quoting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:  # flags (-m, --cfg job) and deletions (~logger)
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException:
            key, _, value = argument.partition("=")
            exit_with(
                UserError(
                    f"{argument!r} is no override Hydra can read: a value with spaces, non-ASCII letters or any of "
                    f"= , [ ] {{ }} ( ) ' \" needs quotes inside the argument. Write \"{key}='{value}'\" (the outer "
                    "quotes for the shell, the inner ones for Hydra)."
                )
            )


# what the file system said (errno), and what the user can do about it
NO_PERMISSION = "You lack the permission: make it readable and writable (chmod u+rw), or use another folder."
FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: "Free space on that disk, or write to one with room.",
    errno.EDQUOT: "Your disk quota there is used up: free some of it, or write elsewhere.",
    errno.EROFS: "That file system is mounted read-only: write to another folder (to score or resume a run there, "
    "copy it to a writable one first).",
    errno.EACCES: NO_PERMISSION,
    errno.EPERM: NO_PERMISSION,
}


def user_error(error: BaseException | None, folder: Path | None = None) -> UserError | None:
    """The UserError behind `error` (also when Hydra's instantiate wrapped it: InstantiationException from it), or
    one that explains a file system's refusal (full, over quota, read-only, no permission) found anywhere in its
    chain, naming the file (or else `folder`, where the command was writing)."""
    cause = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    if cause is not None:
        return cause
    for link in exception_chain(error):
        if isinstance(link, OSError) and link.errno in FILE_SYSTEM_ERRORS:
            where = link.filename or (f"a file while writing into {folder}" if folder else "a file")
            verb = "access" if link.errno in (errno.EACCES, errno.EPERM) else "write"  # reading fails with these too
            cause = f"{link.strerror} ({errno.errorcode[link.errno]})"
            return FileSystemError(f"Could not {verb} {where}: {cause}. {FILE_SYSTEM_ERRORS[link.errno]}")
    return None


class CommandCallback(Callback):
    """A Hydra callback whose failure ends the command. Hydra turns an exception that a callback raises into a warning
    and goes on, to exit 0 (hydra._internal.callbacks): a sweep whose summary failed would pass for a success. So each
    hook that a subclass defines ends the command instead: on bad input or an OSError with one `error:` paragraph
    (exit 2), on anything else with its traceback and exit 1."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, hook in list(vars(cls).items()):
            if name.startswith("on_") and callable(hook):
                setattr(cls, name, _ending_the_command_on_failure(hook))


def _ending_the_command_on_failure(hook: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(hook)
    def run(callback: CommandCallback, *args: Any, **kwargs: Any) -> None:
        try:
            hook(callback, *args, **kwargs)
        except Exception as e:
            error = user_error(e) or (UserError(str(e)) if isinstance(e, OSError) else None)  # ENOENT, ENOTDIR, ...
            if error is not None:
                exit_with(error)
            traceback.print_exc()
            sys.exit(
                f"error: {type(callback).__name__}.{hook.__name__} failed with the traceback above: "
                f"{type(e).__name__}: {e}. This is a fault of autoencoders; please report it with that traceback."
            )

    return run


@contextmanager
def ending_the_command(what: str, folder: Path) -> Iterator[None]:
    """In a CommandCallback's hook: bad input or a file system's refusal in the block ends the command with one
    `error:` paragraph that names the folder being written, exit 2 (`what` names the step, for another OSError)."""
    try:
        yield
    except (UserError, OSError) as e:
        exit_with(user_error(e, folder) or UserError(f"{what} failed: {e}"))


def instantiated(config: Any, group: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate of the `group` node, a bad setting in it (an unknown key, a value the class refuses)
    being a UserError that names the group instead of a raw exception."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise user_error(e) or UserError(
            f"The {group} settings could not be built: {type(cause).__name__}: {str(cause).strip()}. Check the "
            f"{group}.* overrides (`python train.py --cfg job` prints the composed config; a +{group}.<key> must be "
            "an argument that its class takes)."
        ) from None


def discard_created_run_dir() -> None:
    """Remove the run dir that this process created, if its training never started (a rejected command)."""
    for run_dir in created_run_dirs:
        if not training_began(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)


def training_began(run_dir: Path) -> bool:
    """Whether training began in `run_dir` in this process (then the dir stays, whatever happens next)."""
    return run_dir.resolve() in {started.resolve() for started in training_started}


def to_log_file(message: str) -> None:
    """Write `message` to the run's train.log only (Hydra's file handler), not again to the console."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextmanager
def reported_failures() -> Iterator[None]:
    """Wrap one train.py job.

    A single run ends on a UserError with `exit_with`, removing the run dir it created if its training never started
    (a rejected command); once training has started the dir stays, with the error in its train.log. Other errors keep
    their traceback and the dir, whose train.log holds it. A sweep job must not end the
    process (Hydra would stop the whole sweep), so it logs any error, records it in <job dir>/failure.json and returns
    normally; the job then has no result, which Optuna records as a failed trial, and sweeps.FailureSummary lists it
    at the end.
    """
    try:
        with stops_kept():
            yield
    except Exception as e:
        hydra = HydraConfig.get()
        run_dir = Path(hydra.runtime.output_dir)
        bad_input = user_error(e, run_dir)
        if isinstance(bad_input, FileSystemError) and training_began(run_dir):
            bad_input = FileSystemError(f"{bad_input} {how_to_go_on(run_dir, hydra.mode)}")
        if hydra.mode != RunMode.MULTIRUN:
            if bad_input is not None:
                discard_created_run_dir()  # a run whose training started keeps its dir, with the error in train.log
                to_log_file(f"error: {bad_input}")
                exit_with(bad_input)
            raise
        reason = str(bad_input) if bad_input is not None else f"{type(e).__name__}: {e}"
        log.error("Job %s failed: %s", hydra.job.num, reason, exc_info=bad_input is None)
        try:
            write_json(run_dir / FAILURE_FILE, {"job": hydra.job.num, "dir": str(run_dir), "error": reason})
        except (OSError, UserError) as unwritten:  # e.g. the disk that failed the job: its train.log says why
            log.error("Could not record the failure in %s: %s", run_dir / FAILURE_FILE, unwritten)


def how_to_go_on(run_dir: Path, mode: RunMode) -> str:
    """What a run whose training started and then failed can do next: resume, or start again in the same dir."""
    if mode == RunMode.MULTIRUN:
        return (
            "Run the same sweep command again: its finished jobs are skipped, and this one resumes from its last.ckpt "
            "or, without one, starts again."
        )
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return f"To go on from its last checkpoint, run the same command with hydra.run.dir={run_dir} ckpt_path=last."
    return (
        f"{run_dir} holds no checkpoint to resume from: to start the run again there, run the same command with "
        f"hydra.run.dir={run_dir}."
    )


class Stopped(BaseException):
    """SIGTERM (or SLURM's preemption signal outside training), raised in the main thread by `stop` as Python's own
    handler raises KeyboardInterrupt on Ctrl-C: a BaseException, so that no `except Exception` (a sweep job's) takes it
    for a failure."""


stops: list[int] = []  # the signals for which this process raised Stopped


def stop(number: int) -> NoReturn:
    """Raise Stopped in the main thread, from a signal handler, recorded in `stops` for `stops_kept`."""
    stops.append(number)
    raise Stopped(number)


@contextmanager
def stops_kept() -> Iterator[None]:
    """Around a command's work, inside its error handling: a Stopped that the code it landed in turned into another
    error (a pybind11 extension's import makes an ImportError of it), or swallowed (a check of whether a package
    imports), is raised again as the Stopped it was, not taken for a failure (whose traceback Hydra would print)."""
    try:
        yield
    except Exception as e:
        if stops:
            raise Stopped(stops[0]) from e
        raise
    if stops:
        raise Stopped(stops[0])


def _on_sigterm(number: int, frame: Any) -> None:
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:  # called by Lightning's handler, which also calls the
        return  # one it found: inside fit and test Lightning stops at its next step (callbacks.Preemption)
    stop(number)


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Wrap a whole command (train.py, evaluate.py, a sweep): Ctrl-C (SIGINT) or SIGTERM ends it with one line,
    `error: stopped by <signal> ...`, on stderr (and in train.log) and exit code 130 or 143 (128 + the signal), with
    no traceback. What the commands write is written whole or not at all (files.py's writers, an evaluation's staging
    dir, and under checkpoints.signals_deferred checkpoints and a sweep's or transfer study's files at its end), so a
    stop leaves no half-written result; a run dir that this process created but whose training never started is
    removed, as after bad input. A writer thread's or the log file's file-system error is left to the main thread to
    explain (`user_error`), without a traceback of its own.

    Python's default SIGTERM ends the process at once, silently: here it raises Stopped in the main thread instead.
    Inside Lightning's fit and test, Lightning's SIGTERM handler stops at the next step and callbacks.Preemption
    reports it (exit 143, and Ctrl-C there exits 130); such a SystemExit passes through unchanged."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    threading.excepthook = _quiet_file_system_errors
    logging.raiseExceptions = False  # a full disk: no traceback for each line that train.log cannot take
    try:
        yield
    except KeyboardInterrupt:
        _stopped_by(signal.SIGINT)
    except Stopped:
        _stopped_by(signal.SIGTERM)
    except SystemExit as stop:  # Lightning's sys.exit(1) after a KeyboardInterrupt, once Preemption said what was kept
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
            raise SystemExit(128 + signal.SIGINT) from None
        raise


def _quiet_file_system_errors(args: threading.ExceptHookArgs) -> None:
    """A writer thread's file-system error (TensorBoard's on a full disk) without its traceback: the main thread's
    next write raises the same error, which `user_error` explains."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in FILE_SYSTEM_ERRORS):
        threading.__excepthook__(args)


def _stopped_by(number: signal.Signals) -> NoReturn:
    signal.signal(number, signal.SIG_IGN)  # a second Ctrl-C while the run dir is cleaned up does not interrupt that
    message = (
        f"error: stopped by {SIGNAL_NAMES[number]} before the command finished. Run the same command again to redo "
        "what was stopped."
    )
    to_log_file(message)
    discard_created_run_dir()  # after its train.log is written to: a log file reopened in a removed dir would fail
    print(message, file=sys.stderr)
    sys.exit(128 + number)
