"""train.py with faults injected at known training steps, for the reliability tests (never used in production).

    FAULT="pause@3 kill@7" python tests/faulty_train.py <train.py overrides>

Each fault acts at the start of its global step:
    kill   SIGKILL, once the checkpoint in flight is on disk (so that the run's latest checkpoint is known)
    term   SIGTERM, as a scheduler sends before preemption
    int    SIGINT, as Ctrl-C sends
    pause  sleep PAUSE_S seconds, so that a time-based checkpoint falls due at the epoch's end
    nan    NaN inputs, hence a NaN loss

Everything else is the real train.py: the faults join train()'s callbacks through its `extra_callbacks` argument.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

import lightning as L

from autoencoders import training

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
PAUSE_S = 3.0
SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT}


class Fault(L.Callback):
    def __init__(self, kind: str, step: int):
        self.kind, self.step = kind, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "kill":
            trainer.strategy.checkpoint_io.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])
        elif self.kind == "pause":
            time.sleep(PAUSE_S)
        else:
            batch[0].fill_(float("nan"))


def faults(spec: str) -> list[Fault]:
    """`FAULT`'s faults: "kind@step", separated by spaces."""
    return [Fault(kind, int(step)) for kind, step in (fault.split("@") for fault in spec.split())]


def main() -> None:
    injected = faults(os.environ["FAULT"])
    real_train = training.train
    training.train = lambda cfg, extra_callbacks=None: real_train(cfg, [*(extra_callbacks or []), *injected])
    sys.argv[0] = str(TRAIN_PY)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")


if __name__ == "__main__":
    main()
