"""evaluate.py on a tiny two-run sweep (ae, vae) trained here: metrics, pictures, the sweep report and bad input."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import autoencoders
from autoencoders.errors import UserError
from autoencoders.evaluation import build_data, data_config, evaluate, run_config, vae_metrics
from autoencoders.metrics import FeatureNetSettings, FrechetDistance, active_units, feature_net
from autoencoders.pictures import latent_traversal
from autoencoders.sweeps import FAILURE_FILE
from tests.helpers import ROOT, run_script, run_train

FAST = ["k=20", "num_samples=200", "fid.epochs=1", "fid.batch_size=128", "images.num_samples=16"]
PICTURES = {"reconstructions", "samples_prior", "interpolations", "traversal"}


def evaluate_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    run_train("-m", "model=ae,vae", "latent_dim=4", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    run_script("evaluate.py", f"sweep_dir={root / 'sweep'}", f"cache_dir={root / 'cache'}", *FAST, cwd=root)
    return root / "sweep"


def run_dirs(sweep: Path) -> dict[str, Path]:
    return {"ae": next(sweep.glob("0_*")), "vae": next(sweep.glob("1_*"))}


def test_sweep_report_has_one_row_per_run_and_plots(sweep):
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["model"] for r in rows} == {"ae", "vae"} and {r["status"] for r in rows} == {"ok"}
    fids = [float(r["test/fid_prior"]) for r in rows]
    assert fids == sorted(fids)  # sorted by the default sort_by, lower is better
    table = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header and two runs
    for plot in ("rate_distortion.png", "metrics_vs_latent_dim.png"):
        assert Image.open(sweep / plot).size[0] > 100
    assert sorted(p.name for p in sweep.parent.iterdir()) == ["cache", "sweep"]  # evaluate.py left no logs behind


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_each_run_gets_metrics_pictures_and_tensorboard_events_in_eval_only(sweep, model):
    run_dir = run_dirs(sweep)[model]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    expected = {"test/bce", "test/mse", "test/fid_prior", "test/fid_net_accuracy"}
    expected |= {"test/fid_gaussian"} if model == "ae" else {"test/elbo", "test/iwae_k20", "test/kl", "test/recon"}
    assert expected <= set(metrics)
    assert 0 < metrics["test/mse"] < 1 and metrics["test/bce"] > 0 and metrics["test/fid_prior"] > 0
    for name in PICTURES:
        assert Image.open(run_dir / "eval" / f"{name}.png").size[0] > 28
    events = EventAccumulator(str(run_dir / "eval"), size_guidance={"images": 0})
    events.Reload()
    assert {f"eval/{name}" for name in PICTURES} <= set(events.Tags()["images"])
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]


@pytest.fixture(scope="module")
def data(sweep):
    """The data module of the runs, rebuilt from their own config."""
    return build_data(run_config(run_dirs(sweep)["vae"]).data)


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(sweep, data):
    model = autoencoders.load(run_dirs(sweep)["vae"] / "checkpoints" / "last.ckpt")
    x = data.test_set.tensors[0][:200]
    torch.manual_seed(0)
    iwae = {k: vae_metrics(model, x, k, k_chunk=7, batch_size=50)[f"test/iwae_k{k}"] for k in (1, 10, 100)}
    assert iwae[1] < iwae[10] < iwae[100]
    elbo = torch.stack([model.elbo(x) for _ in range(10)]).mean().item()
    assert iwae[100] > elbo
    # k=1 is the ELBO in expectation (with a one-sample KL instead of the closed form)
    log_w = torch.stack([model.log_likelihood(x, k=1) for _ in range(10)]).mean(0)
    assert abs(log_w.mean().item() - elbo) < 4 * log_w.std().item() / len(x) ** 0.5 + 0.5


def test_fid_is_zero_for_the_test_images_themselves_and_large_for_noise(sweep, data):
    cfg = evaluate_config(f"cache_dir={sweep.parent / 'cache'}")
    net, accuracy = feature_net(data, FeatureNetSettings(**cfg.fid), cfg.cache_dir, torch.device("cpu"))
    assert accuracy > 0.5
    images = data.test_set.tensors[0]
    fid = FrechetDistance(net, images, batch_size=100)
    itself, noise = fid.score(images.split(100)), fid.score(torch.rand_like(images).split(100))
    assert abs(itself) < 1e-3 * noise and noise > 10


def test_data_overrides_replace_or_change_the_runs_own_data_config(sweep):
    run = run_dirs(sweep)["vae"]
    changed = data_config(run_config(run), evaluate_config("run_dir=x", "seed=5", "+data.test_fraction=0.2"))
    assert changed.test_fraction == 0.2 and changed.seed == 0  # the split seed stays the run's
    assert changed.source._target_.endswith("MNISTSubset")
    replaced = data_config(run_config(run), evaluate_config("run_dir=x", "seed=5", "data=mnist"))
    assert replaced.source.name == "mnist" and replaced.seed == 0


def test_active_units_count_dims_whose_posterior_mean_varies_across_images():
    torch.manual_seed(0)
    means = torch.randn(1000, 3) * torch.tensor([1.0, 0.05, 0.2])
    assert active_units(means) == 2


def test_latent_traversal_sets_one_dim_per_row():
    model = autoencoders.models.AE((1, 28, 28), latent_dim=3)
    assert latent_traversal(model, torch.rand(1, 1, 28, 28), steps=5, max_dims=2).shape == (10, 1, 28, 28)


def test_failed_runs_and_runs_without_checkpoint_are_listed_not_dropped(sweep, tmp_path):
    shutil.copy(sweep / "multirun.yaml", tmp_path)
    for job in ("0_model=vae", "1_model=vae"):
        shutil.copytree(run_dirs(sweep)["vae"] / ".hydra", tmp_path / job / ".hydra")
    (tmp_path / "1_model=vae" / FAILURE_FILE).write_text(json.dumps({"error": "out of memory"}))
    evaluate(evaluate_config(f"sweep_dir={tmp_path}"))
    with open(tmp_path / "summary.csv") as f:
        rows = [(r["run"], r["status"]) for r in csv.DictReader(f)]
    assert rows == [("0_model=vae", "no checkpoint"), ("1_model=vae", "training failed: out of memory")]


def test_no_target_exits_with_a_clear_error(tmp_path):
    proc = run_script("evaluate.py", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "exactly one of run_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["run_dir=a", "sweep_dir=b"], "exactly one of"),
        (["run_dir=a", "k=0"], "k=0"),
        (["run_dir=a", "num_samples=1"], "num_samples=1"),
        (["run_dir=a", "checkpoint=middle"], "checkpoint=middle"),
        (["run_dir=a", "sort_by=test/nope"], "sort_by=test/nope"),
        (["run_dir=a", "device=tpu"], "device=tpu"),
        (["run_dir=no/such/run"], "does not exist"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        evaluate(evaluate_config(*overrides))


def test_bad_runs_and_files_are_clear_errors(sweep, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        evaluate(evaluate_config(f"ckpt_path={tmp_path / 'notes.ckpt'}", "data=mnist_subset"))
    with pytest.raises(UserError, match="no .hydra/config.yaml"):
        evaluate(evaluate_config(f"run_dir={tmp_path}"))
    with pytest.raises(UserError, match="not a multirun sweep folder"):
        evaluate(evaluate_config(f"sweep_dir={tmp_path}"))


def test_checkpoint_scored_on_data_of_another_shape_is_a_clear_error(sweep, tmp_path):
    for i in range(20):
        folder = tmp_path / "images" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / f"{i}.png")
    overrides = ["data=image_folder", f"data.source.root={tmp_path / 'images'}", "data.source.channels=3"]
    with pytest.raises(UserError, match="trained on 1x28x28 images, but the data to score holds 3x32x32"):
        # a path holding "=" or "," must be quoted for Hydra
        evaluate(evaluate_config(f"run_dir='{run_dirs(sweep)['vae']}'", "data.source.image_size=32", *overrides))
