"""Seconds per epoch of train.py's path (pipeline a of train_speed.py) with each speed lever, against the same run
without it, taking turns in one process; each figure is the median over `--repeats`.

  compile=true     torch.compile of the encoder and decoder (the first epoch pays the compilation);
  NCHW             conv weights in torch's default memory order instead of channels_last (NHWC), which the conv nets
                   use since this benchmark measured it faster;
  1 thread         torch.set_num_threads(1) instead of torch's default (one per core);
  batch B, lr xK   a larger batch with the learning rate scaled by K, so fewer, larger steps per epoch.

Every variant trains for the same number of epochs. `s/epoch` is the mean epoch, `steady` the median epoch after the
first (which pays compilation and warm-up); the test loss (nats per image) shows what a lever costs in quality, so a
faster epoch that learns less is visible as such.

    python benchmarks/levers.py [--models ae conv_ae vae] [--epochs 10] [--repeats 3] [--json FILE] [--quick]
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from train_speed import EpochTimer, compose_config, run_arguments, run_overrides, test_loss

from autoencoders.training import train


class ChannelsFirst(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.to(memory_format=torch.contiguous_format)


# name: (train.py overrides, torch threads or None for torch's default, extra callbacks)
VARIANTS: dict[str, tuple[list[str], int | None, list[type[L.Callback]]]] = {
    "baseline": ([], None, []),
    "compile=true": (["compile=true"], None, []),
    "NCHW": ([], None, [ChannelsFirst]),
    "1 thread": ([], 1, []),
    "batch 256, lr x2": (["data.batch_size=256", "optimizer.lr=2e-3"], None, []),
    "batch 512, lr x4": (["data.batch_size=512", "optimizer.lr=4e-3"], None, []),
}


def run(model: str, variant: str, overrides: list[str], out: Path) -> tuple[float, float, float]:
    """Mean and steady (after the first) seconds per epoch, and test loss, of one run of `model` with `variant`."""
    extra, threads, callbacks = VARIANTS[variant]
    cfg = compose_config([f"model={model}", *overrides, *extra], out)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    timer = EpochTimer(time.perf_counter)
    try:
        metrics = train(cfg, extra_callbacks=[timer, *(c() for c in callbacks)])
    finally:
        torch.set_num_threads(default_threads)
    epochs = timer.epochs()
    return statistics.fmean(epochs), statistics.median(epochs[1:] or epochs), test_loss(metrics)


def main() -> None:
    parser = run_arguments(__doc__, epochs=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    overrides = run_overrides(args)

    Runs = list[tuple[float, float, float]]
    figures: dict[str, dict[str, Runs]] = {m: {v: [] for v in args.variants} for m in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for model in args.models:
                shift = repeat % len(args.variants)
                for i, variant in enumerate(args.variants[shift:] + args.variants[:shift]):
                    out = Path(tmp) / f"{repeat}_{model}_{i}"
                    figures[model][variant].append(run(model, variant, overrides, out))

    results = {}
    for model, by_variant in figures.items():
        base = statistics.median(t for t, _, _ in by_variant["baseline"]) if "baseline" in by_variant else None
        results[model] = {
            variant: {
                "s/epoch": statistics.median(t for t, _, _ in runs),
                "vs baseline": statistics.median(t for t, _, _ in runs) / base if base else None,
                "steady s/epoch": statistics.median(t for _, t, _ in runs),
                "test loss": statistics.median(loss for _, _, loss in runs),
            }
            for variant, runs in by_variant.items()
        }
    print(f"\nload average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}; {' '.join(overrides)}")
    print(f"{'model':10}{'variant':20}{'s/epoch':>10}{'vs baseline':>13}{'steady':>10}{'test loss':>11}")
    for model, by_variant in results.items():
        for variant, f in by_variant.items():
            ratio = "-" if f["vs baseline"] is None else f"{f['vs baseline']:.2f}"
            times = f"{f['s/epoch']:10.3f}{ratio:>13}{f['steady s/epoch']:10.3f}"
            print(f"{model:10}{variant:20}{times}{f['test loss']:11.1f}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
