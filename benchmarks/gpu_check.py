"""Check a GPU machine: the CUDA-only tests, train_speed.py (s/epoch of pipelines a, b and l, and the per-step and
per-epoch costs), peers.py, and peak GPU memory, each step in its own process with its own time limit, every figure
to one JSON file. benchmarks/gpu_check.sh installs what a bare machine lacks and runs this; `--quick` smoke-runs
every step on any machine (the tests check it on a CPU).

    python benchmarks/gpu_check.py [--json gpu_check.json] [--quick]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "gpu or cuda"  # tests/test_devices.py: the sync-free step, the precision choice, the memory format


def steps(quick: bool, figures: Path) -> dict[str, tuple[list[str], int, Path | None]]:
    """name: (command, time limit in seconds, the JSON file it writes); the limits add up to 8 minutes."""
    python, bench = sys.executable, ROOT / "benchmarks"
    device = ["trainer=gpu"] if torch.cuda.is_available() else []
    smoke = ["--quick"] if quick else []
    return {
        "cuda_tests": (
            [python, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", "-k", CUDA_TESTS,
             "tests/test_devices.py"],
            90, None,
        ),
        "train_speed": (
            [python, bench / "train_speed.py", "--pipelines", "a", "b", "l", "--epochs", "5", *smoke,
             "--json", figures / "train_speed.json", *device],
            150, figures / "train_speed.json",
        ),
        "step_costs": (
            [python, bench / "train_speed.py", "--costs", "--pipelines", "a", "b", "l", "--epochs", "5", *smoke,
             "--json", figures / "step_costs.json", *device],
            120, figures / "step_costs.json",
        ),
        "peers": (
            [python, bench / "peers.py", "--seeds", "0", "1", "2", *smoke, "--json", figures / "peers.json", *device],
            120, figures / "peers.json",
        ),
    }  # fmt: skip


def run_step(command: list, limit: int, figures: Path | None) -> dict:
    """Run one step; its exit status, wall time, the end of its output, and the figures it wrote."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [str(c) for c in command], cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        status, output = f"timed out after {limit} s", (stopped.stdout or b"").decode(errors="replace")
    result = {"status": status, "seconds": round(time.perf_counter() - start, 1), "output_tail": output[-3000:]}
    if figures is not None and figures.is_file():
        result["figures"] = json.loads(figures.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where every figure goes")
    parser.add_argument("--quick", action="store_true", help="smoke run of every step (1 epoch, 1 repeat)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "steps": {},
    }
    with tempfile.TemporaryDirectory() as figures:
        for name, (command, limit, written) in steps(args.quick, Path(figures)).items():
            print(f"gpu_check: {name} (at most {limit} s) ...", flush=True)
            report["steps"][name] = run_step(command, limit, written)
            print(f"gpu_check: {name}: status {report['steps'][name]['status']}", flush=True)
            args.json.write_text(json.dumps(report, indent=2))  # what has run so far, should a later step hang
    peaks = [s["figures"].get("peak_gpu_mib") for s in report["steps"].values() if "figures" in s]
    report["peak_gpu_mib"] = max((p for p in peaks if p is not None), default=None)
    args.json.write_text(json.dumps(report, indent=2))
    failed = [name for name, step in report["steps"].items() if step["status"] != 0]
    print(f"gpu_check: every figure is in {args.json}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
