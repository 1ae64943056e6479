"""Wall time of one 4-job sweep of small models under different ways of sharing this machine's cores.

  serial          Hydra's basic launcher: one job after another, each with torch's default thread count;
  serial 1 thread the same with OMP_NUM_THREADS=1;
  joblib n_jobs=N the joblib launcher: N jobs at a time, and train.py's ThreadSplit gives each cores // N threads.

The variants take turns `--repeats` times; each figure is the median. Ratios are against `serial`.

    python benchmarks/sweep_throughput.py [--epochs 5] [--repeats 1] [--quick]
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
SWEEP = ["model=ae,vae", "latent_dim=2,16"]  # 4 jobs
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "serial": ([], {}),
    "serial 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
    "joblib n_jobs=2": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], {}),
    "joblib n_jobs=4": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"], {}),
}


def sweep_time(overrides: list[str], env: dict[str, str], sweep_dir: Path) -> float:
    start = time.perf_counter()
    command = [sys.executable, TRAIN, "-m", *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: serial vs joblib n_jobs=2, 2 batches a job")
    args = parser.parse_args()
    common = [f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu"]
    variants = VARIANTS
    if args.quick:
        common = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                  "trainer.limit_test_batches=1", "trainer.accelerator=cpu"]  # fmt: skip
        variants = {k: VARIANTS[k] for k in ("serial", "joblib n_jobs=2")}

    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (name, (overrides, env)) in enumerate(variants.items()):
                sweep_dir = Path(tmp) / f"{repeat}_{i}"
                times[name].append(sweep_time([*common, *overrides], env, sweep_dir))
    results = {name: statistics.median(t) for name, t in times.items()}

    print(f"\nload average {os.getloadavg()[0]:.1f}; 4 jobs: {' '.join(SWEEP + common)}")
    for name, seconds in results.items():
        print(f"{name:20} {seconds:8.1f} s   serial / this = {results['serial'] / seconds:5.2f}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
