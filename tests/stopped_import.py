"""A module whose import waits for a signal and turns the stop into the ImportError that a pybind11 extension's import
makes of it: `generic_type: type "ObjSense" is already registered!`, when SLURM's preemption signal landed in scipy's
HiGHS as train.py imported its modules (CI, 2026-12-07). The signal tests import it at two points: inside a job, as
training is set up (`+callbacks.stopped_import._target_=tests.stopped_import.Callback`), and inside train.py's import
of autoencoders.training (tests/site on PYTHONPATH, STOPPED_IMPORT_IN=autoencoders.training). Never used in
production."""

import os
import time
from pathlib import Path

import lightning as L

WAITING = "waiting-in-an-import"  # written in the working dir once the import waits (tests.helpers names it too)

if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":  # a requeued job's next run imports it at once
    try:
        Path(WAITING).touch()
        time.sleep(60)
    except BaseException:  # with no link to the stop, which an extension may not keep either
        raise ImportError('generic_type: type "ObjSense" is already registered!') from None


class Callback(L.Callback):
    """Does nothing: named as a callback so that building the run's callbacks imports this module."""
