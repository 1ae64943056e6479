"""The benchmark scripts run and report every figure; their timings are never checked."""

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from autoencoders.data.sources import MNISTSubset
from tests.helpers import ROOT


def run_benchmark(script: str, *args: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_speed_reports_each_pipeline_and_ratio(tmp_path):
    out = tmp_path / "speed.json"
    args = ["--quick", "--models", "conv_ae", "--threads", "1", "--json", str(out)]
    stdout = run_benchmark("train_speed.py", *args, cwd=tmp_path)
    figures = json.loads(out.read_text())["results"]["conv_ae"]
    expected = ["a s/epoch", "b s/epoch", "b_train s/epoch", "c s/epoch", "l s/epoch", "a/b", "a/b_train", "c/a", "l/b"]
    assert all(figures[key] > 0 for key in expected + ["a/l", "a_test", "b_test", "c_test", "l_test"])
    assert all(key in stdout for key in expected)


@pytest.mark.slow
def test_train_speed_costs_report_each_pipelines_per_step_and_per_epoch_cost(tmp_path):
    out = tmp_path / "costs.json"
    run_benchmark("train_speed.py", "--costs", "--quick", "--pipelines", "a", "l", "--json", str(out), cwd=tmp_path)
    figures = json.loads(out.read_text())
    assert figures["steps"] == {"bundled": 32, "enlarged": 313}  # 4,000 and 40,000 training images, batch 128
    assert figures["costs"].keys() == {"a", "l"} and all(f["us/step"] > 0 for f in figures["costs"].values())


# pip's words for a registry it could not reach (its last error then reads "No matching distribution found")
UNREACHABLE = (
    "connection broken by",
    "Failed to establish a new connection",
    "Could not fetch URL",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeout",
    "ProxyError",
)


def python_beside_this_one(folder) -> Path:
    """A virtual environment that sees every package of this interpreter's and installs into its own folder, so what
    gpu_check.sh installs from its kit lands in a temporary folder, not in the environment the tests run in."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site_packages,) = (folder / "lib").glob("python*/site-packages")
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (site_packages / "this_interpreter.pth").write_text(f"import site; list(map(site.addsitedir, {ours!r}))\n")
    return folder / "bin" / "python"


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_writes_one_json_file(tmp_path):
    """On a CPU, as a smoke run: the CUDA-only tests skip, the benchmarks run for one epoch. The kit is packed in a
    temporary folder first, as `--pack` makes it (from PyPI), and completes an environment made for the test."""
    kit, out = tmp_path / "gpu_kit", tmp_path / "gpu_check.json"
    MNISTSubset(os.environ["AUTOENCODERS_CACHE"]).load()  # the cached digits that --pack copies into the kit
    env = {**os.environ, "GPU_KIT": str(kit), "PYTHON": str(python_beside_this_one(tmp_path / "venv"))}
    env["PIP_CACHE_DIR"] = str(tmp_path / "pip-cache")  # pip writes nothing outside tmp_path either
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    pack = subprocess.run(["bash", script, "--pack"], env={**env, "PIP_RETRIES": "2"}, capture_output=True, text=True)
    unreachable = [words for words in UNREACHABLE if words in pack.stdout + pack.stderr]
    if pack.returncode != 0 and unreachable:
        last = pack.stderr.strip().splitlines()[-1]
        pytest.skip(f"gpu_check.sh --pack could not reach the package registry (pip: {unreachable[0]!r}; {last})")
    assert pack.returncode == 0, pack.stdout[-3000:] + pack.stderr[-3000:]
    assert (kit / "mnist_5k.pt").is_file() and list(kit.glob("pythae-0.1.2-*.whl"))
    env.pop("AUTOENCODERS_CACHE")  # the digits come from the kit, as on a GPU machine
    proc = subprocess.run(["bash", script, str(out), "--quick"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"].keys() == {"cuda_tests", "train_speed", "step_costs", "peers"}
    assert all(step["status"] == 0 for step in report["steps"].values())
    assert report["steps"]["step_costs"]["figures"]["costs"]["a"]["us/step"] > 0
    assert "pythae/this s/epoch (median)" in report["steps"]["peers"]["figures"]["comparison"]
    assert f"every figure is in {out}" in proc.stdout


def test_startup_reports_help_and_config_times(tmp_path):
    out = tmp_path / "startup.json"
    run_benchmark("startup.py", "--quick", "--json", str(out), cwd=tmp_path)
    figures = json.loads(out.read_text())["results"]
    assert figures["train.py --help s"] > 0 and figures["train.py --cfg job s"] > 0


@pytest.mark.slow  # in `pytest -m slow`: the default run must stay under 6 minutes
def test_levers_report_each_variant_against_the_baseline(tmp_path):
    out = tmp_path / "levers.json"
    variants = ["baseline", "NCHW", "1 thread", "batch 256, lr x2"]
    args = ["--quick", "--models", "conv_ae", "--variants", *variants, "--json", str(out)]
    run_benchmark("levers.py", *args, cwd=tmp_path)
    figures = json.loads(out.read_text())["results"]["conv_ae"]
    assert figures["baseline"]["vs baseline"] == 1
    assert all(figures[v]["s/epoch"] > 0 and figures[v]["test loss"] > 0 for v in variants)


@pytest.mark.slow  # in `pytest -m slow`: the default run must stay under 6 minutes
def test_checkpoint_save_reports_each_way(tmp_path):
    out = tmp_path / "save.json"
    stdout = run_benchmark("checkpoint_save.py", "--quick", "--json", str(out), cwd=tmp_path)
    figures = json.loads(out.read_text())
    assert figures["size_mb"] > 10 and all(figures["ms"][way] > 0 for way in ("no_crc", "crc", "safe", "safe_wait"))
    assert "x no_crc" in stdout


@pytest.mark.slow  # in `pytest -m slow`: the default run must stay under 6 minutes
def test_callback_costs_times_every_hook_of_train_pys_callbacks(tmp_path):
    stdout = run_benchmark("callback_costs.py", "--quick", cwd=tmp_path)
    assert "ae: " in stdout and "ms per epoch" in stdout
    assert "NanGuard.on_before_backward" in stdout and "all hooks within epochs" in stdout


def test_the_model_zoo_benchmark_runs_every_autoencoder_of_the_zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", ROOT / "benchmarks" / "model_zoo.py")
    spec.loader.exec_module(model_zoo := importlib.util.module_from_spec(spec))
    zoo = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")} - {"m2", "classifier"}
    assert sorted(model_zoo.MODELS) == sorted(zoo)


@pytest.mark.slow
def test_model_zoo_trains_scores_and_reuses_each_model_and_prints_the_table(tmp_path):
    stdout = run_benchmark("model_zoo.py", "--quick", "--out", str(tmp_path / "zoo"), "--models", "ae", "vqvae",
                           cwd=tmp_path)  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["ae", "vqvae"]
    assert all(" % | " in row and row.endswith(" s |") for row in rows)
    assert (tmp_path / "zoo" / "table.md").read_text().strip() in stdout
    width, height = Image.open(tmp_path / "zoo" / "samples.png").size  # a row of 7 square pictures, captioned
    assert width % 7 == 0 and height == width // 7 + 16 and width // 7 > 100


@pytest.mark.slow
def test_the_disentanglement_benchmark_trains_scores_and_tables_every_model_over_seeds(tmp_path):
    stdout = run_benchmark("disentanglement.py", "--quick", "--out", str(tmp_path / "d"), "--seeds", "0", "1",
                           cwd=tmp_path)  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["vae", "β-VAE (kl_weight=4)", "beta_tcvae", "factor_vae"]
    assert all(row.count(" ± ") == 7 for row in rows)
    assert (tmp_path / "d" / "table.md").read_text().strip() in stdout
