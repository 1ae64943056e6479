"""Start-up wall times of train.py, each the median of `--repeats` runs taken in turns.

`--help` and `--cfg job` compose the config without importing torch or lightning; `trainer.fast_dev_run=true` runs one
batch of train, val and test; the bare import of the heavy libraries is shown for reference. `--default-run` also times
the default `python train.py [overrides]` end to end and reads its test -ELBO (nats per image) from metrics.json, plus
the wall time at which its validation -ELBO first reached `--target`.

    python benchmarks/startup.py [--repeats 3] [--default-run [overrides ...]] [--json FILE] [--quick]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
IMPORTS = "import lightning, hydra, torchvision, torchmetrics"


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def default_run(out: Path, target: float, overrides: list[str]) -> dict[str, float | None]:
    """Time `python train.py <overrides>`; read its test -ELBO and when its val -ELBO first reached `target`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = out / "default"
    start = time.time()
    subprocess.run([sys.executable, TRAIN, *overrides, f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
    wall = time.time() - start
    events = EventAccumulator(str(run_dir))
    events.Reload()
    reached = [e.wall_time - start for e in events.Scalars("val/elbo") if -e.value <= target]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "default run s": wall,
        "default run test -ELBO": -metrics["test/elbo"],
        f"default run s to val -ELBO <= {target:g}": reached[0] if reached else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-run", action="store_true", help="also time the default `python train.py`")
    parser.add_argument("--target", type=float, default=120.0, help="val -ELBO (nats) for the time-to-quality figure")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: --help and --cfg job once")
    parser.add_argument(
        "overrides", nargs="*", help="train.py overrides for the default run, e.g. trainer.max_epochs=30"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        commands = {
            "train.py --help": lambda i: [sys.executable, TRAIN, "--help"],
            "train.py --cfg job": lambda i: [sys.executable, TRAIN, "--cfg", "job"],
            "train.py trainer.fast_dev_run=true": lambda i: [
                sys.executable, TRAIN, "trainer.fast_dev_run=true", f"hydra.run.dir={out / f'fast_dev_run_{i}'}"
            ],
            IMPORTS: lambda i: [sys.executable, "-c", IMPORTS],
        }  # fmt: skip
        if args.quick:
            commands = dict(list(commands.items())[:2])
            args.repeats = 1
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.repeats):
            for name, command in commands.items():
                times[name].append(wall_time(command(i)))
        results: dict[str, float | None] = {f"{name} s": statistics.median(t) for name, t in times.items()}
        if args.default_run:
            results |= default_run(out, args.target, args.overrides)

    print(f"\nload average {os.getloadavg()[0]:.1f}, median of {args.repeats}")
    for name, value in results.items():
        print(f"{name:60} {'-' if value is None else f'{value:8.2f}'}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
