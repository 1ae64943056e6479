"""The transfer study's sweeper (conf/hydra/sweeper/transfer.yaml, which experiment=transfer selects). It lives here
because Hydra instantiates sweepers only from the hydra_plugins package; the study itself is autoencoders/transfer.py.
"""

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import HydraException

from autoencoders.cli import FAILURE_FILE
from autoencoders.transfer import PRETRAIN_DIR, check_unseen, pretraining_overrides


class TransferSweeper(BasicSweeper):
    """The basic sweeper, after one job of the configured launcher has pretrained the encoder into
    <sweep dir>/pretrain: under hydra/launcher=slurm the pretraining is a SLURM job like the classifiers.

    That job is `python train.py <the command line's SHARED overrides> <pretrain>` (not experiment=transfer), so
    `data=fashion_mnist`, `latent_dim=32` or `trainer=gpu` apply to the whole study. Every classifier job then gets
    its last.ckpt as encoder_ckpt.
    """

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, pretrain: Sequence[str] = ()):
        super().__init__(max_batch_size, params)
        self.pretrain = list(pretrain)

    def sweep(self, arguments: list[str]) -> Any:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        self._pretrain(arguments, sweep_dir)
        encoder_ckpt = sweep_dir / PRETRAIN_DIR / "checkpoints" / "last.ckpt"
        check_unseen(self.config, encoder_ckpt)
        return super().sweep([f"encoder_ckpt='{encoder_ckpt}'", *arguments])  # a command-line encoder_ckpt wins

    def _pretrain(self, arguments: Sequence[str], sweep_dir: Path) -> None:
        overrides = [
            *pretraining_overrides(arguments),
            *self.pretrain,
            # the study's hydra settings that the job needs, as it is composed without experiment=transfer: this
            # sweeper (the launcher gives every job the command line's hydra.* overrides, hydra.sweeper.pretrain too),
            # the mode (a sweep job records its failure, and is skipped or resumed when the study is run again) and
            # the sweep dir
            f"hydra/sweeper={self.config.hydra.runtime.choices['hydra/sweeper']}",
            "hydra.mode=MULTIRUN",
            f"hydra.sweep.dir='{sweep_dir}'",
            f"hydra.sweep.subdir={PRETRAIN_DIR}",
        ]
        run_dir = sweep_dir / PRETRAIN_DIR
        try:
            self.validate_batch_is_legal([overrides])
        except HydraException as e:
            sys.exit(
                f"error: the pretraining job's overrides ({' '.join(overrides)}) do not compose: "
                f"{str(e).splitlines()[0].rstrip('.')}. Fix hydra.sweeper.pretrain, which holds train.py overrides."
            )
        print(f"transfer study: pretraining the encoder as a job of the launcher: {' '.join(overrides)}", flush=True)
        try:
            (job,) = self.launcher.launch([overrides], initial_job_idx=0)
            value = job.return_value  # raises what the job raised
        except Exception as e:  # also a job that its launcher lost (e.g. one that SLURM cancelled)
            reason = f"{type(e).__name__}: {e}"
        else:
            if value is not None:
                return
            reason = json.loads((run_dir / FAILURE_FILE).read_text())["error"]  # train.py's record of a failed job
        sys.exit(
            f"error: pretraining the encoder failed, so the study stops before any classifier trains: {reason} "
            f"(its log: {run_dir / 'train.log'})"
        )
