"""train.py with one fault injected at a known training step, for the reliability tests (never used in production).

    FAULT=kill@7 python tests/faulty_train.py <train.py overrides>   SIGKILL at the start of global step 7, once the
                                                                     checkpoint in flight is on disk (a moment chosen
                                                                     so that the run's latest checkpoint is known)
    FAULT=nan@7  python tests/faulty_train.py <train.py overrides>   NaN inputs at step 7, hence a NaN loss

Everything else is the real train.py: the fault joins train()'s callbacks through its `extra_callbacks` argument.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import lightning as L

from autoencoders import training

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


class Fault(L.Callback):
    def __init__(self, kind: str, step: int):
        self.kind, self.step = kind, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "kill":
            trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        batch[0].fill_(float("nan"))


def main() -> None:
    kind, step = os.environ["FAULT"].split("@")
    real_train = training.train
    training.train = lambda cfg, extra_callbacks=None: real_train(
        cfg, [*(extra_callbacks or []), Fault(kind, int(step))]
    )
    sys.argv[0] = str(TRAIN_PY)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")


if __name__ == "__main__":
    main()
