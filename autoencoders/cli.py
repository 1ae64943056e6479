"""How a command ends on bad input or a failed sweep job: one `error:` paragraph on stderr and exit code 2 (no
traceback, and no run dir left behind by a rejected command), or a failure record that lets the sweep go on.

Imported before torch (train.py's Hydra callbacks use it at start-up)."""

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from autoencoders.errors import EveryProcessError, UserError

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"  # in a failed sweep job's dir
created_run_dirs: list[Path] = []  # the run dir that this process created (rundirs.claim), if any


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


def user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when Hydra's instantiate wrapped it (InstantiationException from it)."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error


def discard_created_run_dir() -> None:
    """Remove the run dir that this process created, if it holds no checkpoint or metrics (a rejected command)."""
    for run_dir in created_run_dirs:
        if not (list(run_dir.glob("checkpoints/*.ckpt")) or (run_dir / "metrics.json").exists()):
            shutil.rmtree(run_dir, ignore_errors=True)


@contextmanager
def reported_failures() -> Iterator[None]:
    """Wrap one train.py job.

    A single run ends on a UserError with `exit_with`, removing the run dir it created (nothing was trained); other
    errors keep their traceback and the dir, whose train.log holds it. A sweep job must not end the
    process (Hydra would stop the whole sweep), so it logs any error, records it in <job dir>/failure.json and returns
    normally; the job then has no result, which Optuna records as a failed trial, and sweeps.FailureSummary lists it
    at the end.
    """
    try:
        yield
    except Exception as e:
        hydra, bad_input = HydraConfig.get(), user_error(e)
        if hydra.mode != RunMode.MULTIRUN:
            if bad_input is not None:
                discard_created_run_dir()
                exit_with(bad_input)
            raise
        reason = str(bad_input) if bad_input is not None else f"{type(e).__name__}: {e}"
        log.error("Job %s failed: %s", hydra.job.num, reason, exc_info=bad_input is None)
        record = {"job": hydra.job.num, "dir": hydra.runtime.output_dir, "error": reason}
        (Path(hydra.runtime.output_dir) / FAILURE_FILE).write_text(json.dumps(record, indent=2))
