"""What each of train.py's callbacks costs an epoch: every hook of every configured callback (checkpoints, images,
progress bar, NaN guard, seeds) timed on the training thread over a train.py run, as ms per epoch and as a share of
the mean epoch, measured in the same run. The part of a/l in train_speed.py that is not Lightning's own.

    python benchmarks/callback_costs.py [--model ae] [--epochs 10] [--top 12] [--quick] [overrides ...]
"""

import argparse
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
from train_speed import EpochTimer, compose_config

from autoencoders.training import train

# hooks that run before the first epoch starts or after the last ends, outside the timed epochs
OUTSIDE_EPOCHS = ("on_fit", "on_train_start", "on_train_end", "on_sanity_check", "on_test", "on_predict")


class HookTimer(L.Callback):
    """Wraps every hook of the Trainer's other callbacks with a timer, at setup (before any of them runs)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, (HookTimer, EpochTimer)):
                continue
            for name in dir(L.Callback):
                if name.startswith("on_") and callable(getattr(callback, name)):  # None: a hook Lightning skips
                    setattr(callback, name, self._timed(type(callback).__name__, name, getattr(callback, name)))

    def _timed(self, owner: str, hook: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[(owner, hook)] += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ae")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="how many (callback, hook) rows to print")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 2 batches")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. data.batch_size=256")
    args = parser.parse_args()
    limits = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    epochs = 1 if args.quick else args.epochs
    overrides = [f"model={args.model}", f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu", *args.overrides]
    hooks, timer = HookTimer(), EpochTimer(time.perf_counter)
    with tempfile.TemporaryDirectory() as tmp:
        train(compose_config([*overrides, *(limits if args.quick else [])], Path(tmp)), [timer, hooks])
    epoch = sum(timer.epochs()) / epochs
    per_epoch = {k: s / epochs for k, s in hooks.seconds.items() if not k[1].startswith(OUTSIDE_EPOCHS)}
    in_epochs = sum(per_epoch.values())
    print(f"{args.model}: {1000 * epoch:.1f} ms per epoch (mean of {epochs}); each hook's ms per epoch, share of it:")
    for (owner, hook), seconds in sorted(per_epoch.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {owner + '.' + hook:<42} {1000 * seconds:7.1f} ms  {100 * seconds / epoch:5.1f}%")
    print(f"  {'all hooks within epochs':<42} {1000 * in_epochs:7.1f} ms  {100 * in_epochs / epoch:5.1f}%")


if __name__ == "__main__":
    main()
