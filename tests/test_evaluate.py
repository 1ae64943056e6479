"""evaluate.py on a tiny two-run sweep (ae, vae) trained here: metrics, pictures, the sweep report and bad input."""

import csv
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import autoencoders
from autoencoders import report
from autoencoders.cli import FAILURE_FILE
from autoencoders.errors import UserError
from autoencoders.evaluation import device, evaluate, reconstruction_metrics, sampler_identity, vae_metrics
from autoencoders.loggers import EVAL_RECORD
from autoencoders.metrics import FeatureNetSettings, SampleQuality, _cache_key, accuracy, active_units, feature_net
from autoencoders.pictures import latent_traversal
from autoencoders.rundirs import lock_run_dir, unlock_run_dir
from autoencoders.saved_runs import build_data, data_config, run_config
from tests.helpers import ROOT, in_browser, run_script, run_train

FAST = ["k=20", "kid_subsets=10", "fid.epochs=1", "fid.batch_size=128", "images.num_samples=16"]
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


def eval_dir(run_dir: Path, split: str = "test") -> Path:
    (found,) = (run_dir / "eval").glob(f"best-*_{split}_mnist_subset-*")
    return found


def test_sweep_report_ranks_on_validation_and_reports_test_beside_it(sweep):
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["model"] for r in rows} == {"ae", "vae"} and {r["status"] for r in rows} == {"ok"}
    fids = [float(r["val/fid_prior"]) for r in rows]
    assert fids == sorted(fids)  # sorted by the default sort_by, val/fid_prior: lower is better
    assert {"val/nll", "test/nll", "val/fid_floor", "test/kid_prior"} <= set(rows[0])
    for row in rows:  # each column is its own split's evaluation
        run = sweep / row["run"]
        for split in ("val", "test"):
            metrics = json.loads((eval_dir(run, split) / "metrics.json").read_text())
            assert float(row[f"{split}/fid_floor"]) == pytest.approx(metrics[f"{split}/fid_floor"])
    table = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 6  # the leaderboard's and every job's: a header and two runs each
    assert (
        "a validation metric: the test columns are reported, not used to choose" in (sweep / "summary.md").read_text()
    )
    assert Image.open(sweep / "metrics_vs_latent_dim.png").size[0] > 100
    assert not (sweep / "rate_distortion.png").exists()  # drawn only through two kl_weights or more
    assert sorted(p.name for p in sweep.parent.iterdir()) == ["cache", "sweep"]  # evaluate.py left no logs behind


def test_report_html_is_one_self_contained_page_of_the_tables_plots_and_every_runs_pictures(sweep):
    page = (sweep / "report.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    pictures = [p for run in run_dirs(sweep).values() for p in eval_dir(run, "val").glob("*.png")]  # scored ones
    assert len(pictures) >= 10 and len(sources) == 1 + len(pictures)  # and the one plot (one kl_weight: no R-D)
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in sources)
    assert page.index("<h2>Leaderboard") < page.index("<h2>Pictures") < page.index("<details>") and "job 1_" in page
    run_page = (eval_dir(run_dirs(sweep)["vae"]) / "report.html").read_text()
    assert "<td><code>test/nll</code></td>" in run_page and run_page.count('src="data:image/png;base64,') >= 5


@pytest.mark.slow  # a browser: `pytest -m slow`
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_report_html_opens_from_disk_in_a_real_browser_with_every_image_decoded(sweep, tmp_path):
    """Headless Chromium loads report.html from a copy in another folder (so nothing beside it can help) in a frame
    of a page that counts its tables and the images that decoded."""
    shutil.copy(sweep / "report.html", tmp_path / "report.html")
    (tmp_path / "check.html").write_text(
        '<iframe id="r" src="report.html"></iframe><pre id="out"></pre><script>'
        "r.onload = () => { const d = r.contentDocument, images = [...d.images]; out.textContent = JSON.stringify({"
        'tables: d.querySelectorAll("table").length, images: images.length,'
        "decoded: images.filter(i => i.complete && i.naturalWidth > 0).length}); };</script>"
    )
    found = in_browser(tmp_path / "check.html")
    assert found["tables"] == 3 and found["images"] >= 10 and found["decoded"] == found["images"]  # 3: leaderboard,
    # pictures, every job


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_each_run_gets_metrics_pictures_and_tensorboard_events_in_eval_only(sweep, model):
    run_dir = run_dirs(sweep)[model]
    out = eval_dir(run_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {"test/mse", "test/recon", "test/fid_prior", "test/kid_prior", "test/kid_prior_std", "test/fid_floor"}
    expected |= {"test/kid_floor", "test/fid_net_accuracy"}
    expected |= {f"test/{score}_{sampler}" for score in ("fid", "kid") for sampler in ("gaussian", "gmm")}
    expected |= set() if model == "ae" else {"test/elbo", "test/nll", "test/bpd", "test/kl"}
    assert expected <= set(metrics)
    assert 0 < metrics["test/mse"] < 1 and metrics["test/recon"] > 0 and metrics["test/fid_prior"] > 0
    assert metrics["test/fid_floor"] < metrics["test/fid_prior"]  # real held-out digits beat an untrained model's
    assert metrics["test/kid_prior_std"] > 1e-4 and metrics["test/kid_floor_std"] > 1e-4  # subsets that differ
    if model == "vae":  # bits per dim of the binarised 784-pixel digits, from the IWAE bound
        assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (784 * math.log(2)))
        assert metrics["test/nll"] <= -metrics["test/elbo"] + 1
    for name in PICTURES:
        assert Image.open(out / f"{name}.png").size[0] > 28
    events = EventAccumulator(str(run_dir / "eval" / EVAL_RECORD), size_guidance={"images": 0})  # the run <run>/eval
    events.Reload()
    assert {f"verdict/test/{name}" for name in PICTURES} <= set(events.Tags()["images"])
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert sorted(p.name.split("_")[1] for p in (run_dir / "eval").glob("[!.]*") if p.is_dir()) == ["test", "val"]


def test_a_run_is_scored_on_the_split_asked_for_in_its_own_folder(sweep, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(run_dirs(sweep)["vae"], run, ignore=shutil.ignore_patterns("eval"))
    with caplog.at_level(logging.INFO, logger="autoencoders.evaluation"):
        (val,) = evaluate(evaluate_config(f"run_dir={run}", "split=val", "num_samples=0", f"cache_dir={tmp_path}"))
    said = [r.getMessage() for r in caplog.records]
    for step in ("reconstructions of the 500 images", "nll: the IWAE bound with k=20", "samplers: prior", "pictures"):
        assert any(step in line for line in said), said  # no silent half minute between "Scoring" and the table
    expected = {"val/nll", "val/nll_k", "val/bpd", "val/elbo", "val/recon", "val/kl", "val/active_units", "val/mse"}
    assert set(val) == expected and val["val/nll_k"] == 20  # FAST's k: the importance samples behind val/nll
    fitted = {p.name.split("_")[1]: p.stat().st_mtime_ns for p in (tmp_path / "samplers").iterdir()}
    assert set(fitted) == {"gaussian", "gmm"}  # fitted to the checkpoint's training codes, for its picture grids
    (test,) = evaluate(evaluate_config(f"run_dir={run}", "num_samples=0", f"cache_dir={tmp_path}"))
    assert {p.name.split("_")[1]: p.stat().st_mtime_ns for p in (tmp_path / "samplers").iterdir()} == fitted
    assert all(name.startswith("test/") for name in test)
    assert len([p for p in (run / "eval").glob("[!.]*") if p.is_dir()]) == 2  # beside the TensorBoard record
    assert json.loads((eval_dir(run, "val") / "metrics.json").read_text()) == val


def test_evaluations_with_other_settings_get_folders_of_their_own(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dirs(sweep)["vae"], run, ignore=shutil.ignore_patterns("eval"))
    settings = [f"run_dir={run}", "num_samples=0", "samplers=[prior]", f"cache_dir={tmp_path}"]
    scored = {k: evaluate(evaluate_config(*settings, f"k={k}"))[0] for k in (2, 3)}
    evaluate(evaluate_config(*settings, "k=3", "batch_size=50", "k_chunk=1"))  # the same numbers: replaces its own
    folders = [p for p in (run / "eval").glob("[!.]*") if p.is_dir()]
    assert len(folders) == 2
    found = {json.loads((f / "metrics.json").read_text())["test/nll_k"]: f for f in folders}
    assert set(found) == {2, 3}
    assert json.loads((found[2] / "metrics.json").read_text()) == scored[2]


@pytest.mark.slow  # fits two nets and a FID feature net: `pytest -m slow`
def test_the_flow_and_two_stage_samplers_are_fitted_once_cached_and_scored_with_fid_and_kid(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dirs(sweep)["vae"], run, ignore=shutil.ignore_patterns("eval"))
    settings = [f"run_dir={run}", "samplers=[maf,two_stage]", "num_samples=50", "kid_subsets=5", "fid.epochs=1",
                "k=2", f"cache_dir={tmp_path}"]  # fmt: skip
    (scores,) = evaluate(evaluate_config(*settings))
    names = [f"test/{m}_{s}" for m in ("fid", "kid") for s in ("maf", "two_stage")]
    assert all(math.isfinite(scores[name]) for name in names)
    fitted = {p: p.stat().st_mtime_ns for p in (tmp_path / "samplers").iterdir()}
    assert sorted(p.name.split("_", 1)[1].rsplit("_", 1)[0] for p in fitted) == ["maf", "two_stage"]
    assert evaluate(evaluate_config(*settings))[0] == scores  # read back from the cache: the same draws
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "samplers").iterdir()} == fitted


def test_more_samples_than_the_floor_has_training_images_is_refused_before_any_scoring(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dirs(sweep)["vae"], run, ignore=shutil.ignore_patterns("eval"))
    fix = r"num_samples=null \(as many as the test split's 500 images\) or num_samples<=4000"
    with pytest.raises(UserError, match=r"num_samples=5000 is more than the 4000 training images(.|\n)*" + fix):
        evaluate(evaluate_config(f"run_dir={run}", "num_samples=5000", "samplers=[prior]", f"cache_dir={tmp_path}"))
    assert not (tmp_path / "fid_features").exists() and not (run / "eval").exists()  # no feature net trained


def test_a_vqvae_is_scored_on_its_quantised_codes():
    model = autoencoders.models.VQVAE((1, 28, 28), latent_dim=8, embedding_dim=4).eval()
    images = torch.randint(0, 2, (30, 1, 28, 28), dtype=torch.uint8) * 255
    with torch.no_grad():
        expected = model.reconstruction_nll(images.float() / 255).mean().item()
    assert reconstruction_metrics(model, images, batch_size=7)["recon"] == pytest.approx(expected, abs=1e-4)


def test_cached_nets_and_samplers_are_keyed_by_torch_version_and_device(tmp_path, monkeypatch):
    images, labels = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    data = type("Data", (), {"image_shape": (1, 28, 28)})()
    settings = FeatureNetSettings(epochs=1, batch_size=2, lr=1e-3, num_features=8, seed=0)
    cfg = evaluate_config("run_dir=x")
    (tmp_path / "a.ckpt").write_bytes(b"weights")

    def keys():
        return (
            _cache_key(images, labels, data, settings, torch.device("cpu")),
            _cache_key(images, labels, data, settings, torch.device("cuda")),
            sampler_identity(tmp_path / "a.ckpt", "mnist-1", cfg),
        )

    before = keys()
    assert before[0] != before[1]  # a net trained on a GPU has other weights than one trained on the CPU
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    after = keys()
    assert all(a != b for a, b in zip(before, after, strict=True))
    monkeypatch.setattr(autoencoders.evaluation, "CACHE_VERSION", 99)
    assert sampler_identity(tmp_path / "a.ckpt", "mnist-1", cfg) != after[2]


def test_a_run_dir_that_is_a_file_is_called_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(UserError, match=r"run_dir=.*run is a file, not a folder"):
        evaluate(evaluate_config(f"run_dir={tmp_path / 'run'}"))


@pytest.fixture(scope="module")
def data(sweep):
    """The data module of the runs, rebuilt from their own config."""
    return build_data(run_config(run_dirs(sweep)["vae"]).data)


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(sweep, data):
    model = autoencoders.load(run_dirs(sweep)["vae"] / "checkpoints" / "last.ckpt")
    test_images = data.test_set.images[:200]  # uint8, as evaluate.py passes them
    x = data.inputs("test")[:200]
    torch.manual_seed(0)
    log_px = {k: -vae_metrics(model, test_images, k, k_chunk=7, batch_size=50)["nll"] for k in (1, 10, 100)}
    assert log_px[1] < log_px[10] < log_px[100]
    elbo = torch.stack([model.elbo(x) for _ in range(10)]).mean().item()
    assert log_px[100] > elbo
    # k=1 is the ELBO in expectation (with a one-sample KL instead of the closed form)
    log_w = torch.stack([model.log_likelihood(x, k=1) for _ in range(10)]).mean(0)
    assert abs(log_w.mean().item() - elbo) < 4 * log_w.std().item() / len(x) ** 0.5 + 0.5


def test_fid_and_kid_are_near_their_floor_for_real_images_and_large_for_noise(sweep, data):
    cfg = evaluate_config(f"cache_dir={sweep.parent / 'cache'}")
    net = feature_net(data, FeatureNetSettings(**cfg.fid), cfg.cache_dir, device(cfg.device))  # as evaluate.py did
    assert accuracy(net, *data.real_split("test")) > 0.5
    reference, test = data.real_split("full_train")[0], data.real_split("test")[0]
    quality = SampleQuality(net, reference, len(test), batch_size=100, subsets=20)
    part = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[: len(test)]]
    itself = quality.score(part.split(100))  # the split is ordered by class: a random part of it
    held_out, noise = quality.score(test.split(100)), quality.score(torch.rand_like(test).split(100))
    assert 0 < itself["fid"] < 2 * held_out["fid"] < 0.1 * noise["fid"]  # FID's floor at 500 images is not 0
    assert abs(held_out["kid"]) < 5 * held_out["kid_std"] + 1e-3 < noise["kid"]  # KID is unbiased: about 0
    # the feature net is one per dataset: the same for a run of another seed and fewer labels
    other = build_data(OmegaConf.merge(run_config(run_dirs(sweep)["vae"]).data, {"seed": 7, "labels_per_class": 5}))
    again = feature_net(other, FeatureNetSettings(**cfg.fid), cfg.cache_dir, device(cfg.device))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    assert len(list((sweep.parent / "cache" / "fid_features").iterdir())) == 1


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two sets of features, computed apart from torchmetrics: scipy's matrix square root, in float64."""
    from scipy.linalg import LinAlgWarning, sqrtm

    a, b = a.double().numpy(), b.double().numpy()
    mean_a, mean_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # ReLU units that never fire make the covariances singular: exact all the same
        warnings.simplefilter("ignore", LinAlgWarning)
        root = sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_each_split_scores_samples_against_its_own_images_and_its_floor_is_as_many_training_images(sweep, data):
    """val/ and test/ FIDs are two checks, not one number twice: each floor equals FID, computed independently, of
    `fid_samples` training images (evaluate.py's draw) against that split's `fid_real` images."""
    cfg = evaluate_config(f"cache_dir={sweep.parent / 'cache'}")
    net = feature_net(data, FeatureNetSettings(**cfg.fid), cfg.cache_dir, device(cfg.device)).eval()
    train = data.real_split("full_train")[0]
    found = {}
    for split in ("val", "test"):
        metrics = json.loads((eval_dir(run_dirs(sweep)["vae"], split) / "metrics.json").read_text())
        real = data.real_split(split)[0]
        assert metrics[f"{split}/fid_real"] == len(real) and metrics[f"{split}/fid_samples"] == len(real)  # null
        drawn = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: len(real)]]
        with torch.no_grad():
            expected = frechet_distance(net(drawn), net(real))
        assert metrics[f"{split}/fid_floor"] == pytest.approx(expected, rel=1e-3)
        found[split] = metrics
    assert found["val"]["val/fid_prior"] != found["test"]["test/fid_prior"]  # other reference images


def test_data_overrides_replace_or_change_the_runs_own_data_config(sweep):
    run = run_dirs(sweep)["vae"]
    changed = data_config(run_config(run), evaluate_config("run_dir=x", "seed=5", "+data.test_fraction=0.2"))
    assert changed.test_fraction == 0.2 and changed.seed == 0 and changed.split_seed == 0  # the run's own
    assert changed.source._target_.endswith("MNISTSubset")
    replaced = data_config(run_config(run), evaluate_config("run_dir=x", "seed=5", "data=mnist"))
    assert replaced.source.name == "mnist" and replaced.seed == 0


def test_active_units_count_dims_whose_posterior_mean_varies_across_images():
    torch.manual_seed(0)
    means = torch.randn(1000, 3) * torch.tensor([1.0, 0.05, 0.2])
    assert active_units(means) == 2


def test_the_traversal_sweeps_each_dim_over_3_stds_of_the_codes_a_vaes_in_order_of_kl():
    model = autoencoders.models.VAE((1, 28, 28), latent_dim=3)
    images = torch.rand(50, 1, 28, 28)
    decoded = []
    model.decode = lambda z: decoded.append(z) or torch.zeros(len(z), 1, 28, 28)
    assert latent_traversal(model, images, steps=5, max_dims=2).shape == (10, 1, 28, 28)
    (z,) = decoded
    mu, logvar = model.posterior(images)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0, 1)
    ).mean(0)
    first, second = torch.argsort(kl, descending=True)[:2].tolist()
    rows = z.view(2, 5, 3).detach()
    spread = torch.linspace(-3, 3, 5) * mu.std(0)[first] + mu.mean(0)[first]
    torch.testing.assert_close(rows[0, :, first], spread)
    torch.testing.assert_close(rows[0, :, second], mu[0, second].detach().expand(5))  # the others: image 0's code
    assert len(torch.unique(rows[1, :, second])) == 5


def test_failed_running_and_crashed_jobs_are_listed_with_their_status_not_dropped(sweep, tmp_path):
    shutil.copy(sweep / "multirun.yaml", tmp_path)
    jobs = [tmp_path / f"{n}_model=vae" for n in range(3)]
    for job in jobs:
        shutil.copytree(run_dirs(sweep)["vae"] / ".hydra", job / ".hydra")
    (jobs[1] / FAILURE_FILE).write_text(json.dumps({"error": "out of memory"}))
    lock_run_dir(jobs[2])  # as a training process holds it
    try:
        with pytest.raises(UserError, match=r"3 of the 3 jobs .* could not be scored(.|\n)*1_model=vae: failed"):
            evaluate(evaluate_config(f"sweep_dir={tmp_path}"))
    finally:
        unlock_run_dir(jobs[2])
    with open(tmp_path / "summary.csv") as f:
        rows = [(r["run"], r["status"]) for r in csv.DictReader(f)]
    assert rows[0][1].startswith("crashed: it stopped without writing metrics.json") and rows[0][1].endswith(
        "it saved no checkpoint"
    )
    assert rows[1:] == [("1_model=vae", "failed: out of memory"),
                        ("2_model=vae", f"running: process {os.getpid()} is training in it")]  # fmt: skip


def test_a_failing_sweep_evaluation_exits_nonzero_and_keeps_the_better_summary(sweep, tmp_path):
    """Scoring on data that is not on disk fails for every job: the earlier, good report stays byte for byte."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    before = {name: (copy / name).read_bytes() for name in ("summary.csv", "summary.md", "metrics_vs_latent_dim.png")}
    proc = run_script(
        "evaluate.py", f"sweep_dir={copy}", "data=fashion_mnist", f"data.source.root={tmp_path / 'nowhere'}", *FAST,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: 2 of the 2 jobs" in proc.stderr and "were kept as they were" in proc.stderr
    assert {name: (copy / name).read_bytes() for name in before} == before


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
        (["run_dir=a", "sort_by=val/nope"], "sort_by=val/nope"),
        (["run_dir=a", "sort_by=val/fid_samples"], "sort_by=val/fid_samples is not a score to rank on"),
        (["run_dir=a", "sort_by=test/nll"], "would choose among the runs on the test split"),
        (["run_dir=a", "split=train"], "split=train"),
        (["run_dir=a", "device=tpu"], "device=tpu"),
        (["run_dir=a", "samplers=[prior,flow]"], "holds flow, which is unknown"),
        (["run_dir=a", "gmm_components=0"], "gmm_components=0"),
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
    with pytest.raises(UserError, match="is a file, not a folder"):
        evaluate(evaluate_config(f"run_dir={tmp_path / 'notes.ckpt'}"))
    with pytest.raises(UserError, match="is a folder, not a checkpoint file"):
        evaluate(evaluate_config(f"ckpt_path={tmp_path}", "data=mnist_subset"))
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


def test_a_sweep_report_over_seeds_gives_each_configuration_mean_and_std_ranked_on_validation(tmp_path):
    """Jobs that differ only in `seed` are one configuration: its mean ± std over seeds (numpy's, ddof=1), ranked
    on the validation mean; a failed job counts in no mean."""
    val_recon = {  # (overrides, model, kl_weight): val/recon of seeds 0, 1, ...
        ("model=ae latent_dim=2", "ae", None): [110.0, 112.0, 117.0],
        ("model=vae latent_dim=2", "vae", 1.0): [105.0, 104.0],
        ("model=vae latent_dim=2 kl_weight=4", "vae", 4.0): [120.0, 126.0],
    }
    rows = [
        {"run": f"{i}_job", "status": "ok", "model": model, "latent_dim": 2, "kl_weight": kl_weight,
         "overrides": [*overrides.split(), f"seed={seed}"], "val/recon": value, "test/recon": value + 1,
         "test/kl": value / 10}
        for i, ((overrides, model, kl_weight), values) in enumerate(val_recon.items())
        for seed, value in enumerate(values)
    ]  # fmt: skip
    rows.append({"run": "9_job", "status": "failed: NaN", "model": "ae", "latent_dim": 2, "kl_weight": None,
                 "overrides": ["model=ae", "latent_dim=2", "seed=3"]})  # fmt: skip
    report.write_report(tmp_path, rows, "val/recon")

    with open(tmp_path / "summary_over_seeds.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["configuration"] for row in table] == [
        "model=vae latent_dim=2", "model=ae latent_dim=2", "model=vae latent_dim=2 kl_weight=4"
    ]  # lower val/recon is better  # fmt: skip
    for row in table:
        (values,) = [np.array(v) for (overrides, *_), v in val_recon.items() if overrides == row["configuration"]]
        assert int(row["n"]) == len(values)
        assert float(row["val/recon mean"]) == pytest.approx(values.mean())
        assert float(row["val/recon std"]) == pytest.approx(values.std(ddof=1))
        assert float(row["test/recon mean"]) == pytest.approx(values.mean() + 1)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Over seeds" in summary and f"| 113 ± {np.std([110, 112, 117], ddof=1):.2g} (3) |" in summary
    for plot in ("rate_distortion.png", "metrics_vs_latent_dim.png"):
        assert Image.open(tmp_path / plot).size[0] > 100
    figure = report.metrics_vs_latent_dim(report.over_seeds(rows, ["val/recon"], "val/recon"), ["val/recon"])
    (legend,) = figure.legends  # one entry per line, error bars and all
    assert sorted(t.get_text() for t in legend.get_texts()) == ["model=ae", "model=vae", "model=vae kl_weight=4"]

    one_seed_each = [row for row in rows if row["overrides"][-1] == "seed=0"]
    report.write_report(tmp_path, one_seed_each, "val/recon")  # the same sweep dir, evaluated again
    assert (
        not (tmp_path / "summary_over_seeds.csv").exists()
        and "## Over seeds" not in (tmp_path / "summary.md").read_text()
    )


QUICK = [*FAST, "num_samples=0", "samplers=[prior]", "k=2"]  # no FID net: the status and data checks alone


def test_a_transfer_study_scores_its_pretrained_autoencoders_not_its_classifiers(sweep, tmp_path):
    """A transfer study's classifier jobs have encoder_ckpt=<sweep>/pretrain/seed-${seed}/... among their overrides,
    which resolves only in the job's config: evaluate.py scores the study's pretrained autoencoders instead."""
    study = tmp_path / "study"
    shutil.copytree(run_dirs(sweep)["vae"], study / "pretrain" / "seed-0", ignore=shutil.ignore_patterns("eval"))
    shutil.copy(sweep / "multirun.yaml", study)
    classifier = study / "0_data.labels_per_class=1,transfer=frozen"
    shutil.copytree(run_dirs(sweep)["vae"] / ".hydra", classifier / ".hydra")
    (classifier / ".hydra" / "overrides.yaml").write_text(
        f"- transfer=frozen\n- encoder_ckpt={study}/pretrain/seed-${{seed}}/checkpoints/last.ckpt\n"
    )
    (study / ".transfer_jobs").mkdir()
    proc = run_script("evaluate.py", f"sweep_dir={study}", f"cache_dir={tmp_path}", *QUICK, cwd=tmp_path)
    assert "is a transfer study: scoring its 1 pretrained autoencoders" in proc.stdout + proc.stderr
    with open(study / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["run"] == "pretrain/seed-0" and row["status"] == "ok" and float(row["val/nll"]) > 0


def test_run_dir_and_sweep_dir_follow_one_rule_for_running_and_crashed_runs(sweep, tmp_path):
    """A running job is refused by both; a crashed (killed) one is scored by both, which say so on the console and in
    the report, and the sweep's message lists it apart from the jobs that could not be scored."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("eval", "summary*"))  # no earlier report to keep
    running, crashed = run_dirs(copy)["ae"], run_dirs(copy)["vae"]
    (crashed / "metrics.json").unlink()  # as a SIGKILLed run leaves it: checkpoints, no metrics.json, no failure.json
    settings = [f"cache_dir={tmp_path / 'cache'}", *QUICK]
    lock_run_dir(running)  # as a training process holds it
    try:
        proc = run_script("evaluate.py", f"sweep_dir={copy}", *settings, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        with pytest.raises(UserError, match=rf"{running} is not scored: running: process {os.getpid()}"):
            evaluate(evaluate_config(f"run_dir={running}", *settings))
    finally:
        unlock_run_dir(running)
    message = proc.stderr.split("error: ", 1)[1]
    assert message.startswith("1 of the 2 jobs") and running.name in message and crashed.name not in message
    assert "stopped before they finished; the checkpoints they left are scored" in proc.stdout + proc.stderr
    with open(copy / "summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows[running.name]["status"].startswith("running: process") and not rows[running.name]["val/nll"]
    assert rows[crashed.name]["status"].startswith("crashed: it stopped without writing metrics.json")
    assert "is scored" in rows[crashed.name]["status"] and float(rows[crashed.name]["val/nll"]) > 0
    assert not (running / "eval").exists()  # nothing written into a run that is training

    shutil.rmtree(crashed / "eval")
    proc = run_script("evaluate.py", f"run_dir={crashed}", "split=val", *settings, cwd=tmp_path)
    assert "crashed: it stopped without writing metrics.json" in proc.stdout + proc.stderr
    assert "crashed: it stopped" in (eval_dir(crashed, "val") / "report.html").read_text()


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_an_image_folder_changed_since_training_is_refused(tmp_path):
    """The checkpoints carry a fingerprint of the data; a folder with an image added is split anew: refused."""
    root = tmp_path / "images"
    for i in range(40):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("L", (28, 28), i * 5).save(root / str(i % 2) / f"{i}.png")
    data = ["data=image_folder", f"data.source.root={root}"]
    run_train("model=ae", "latent_dim=2", *data, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    Image.new("L", (28, 28), 255).save(root / "1" / "new.png")
    proc = run_script("evaluate.py", f"run_dir={tmp_path / 'run'}", *QUICK, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"The data of run {tmp_path / 'run'} changed since it trained" in proc.stderr
    assert "Restore the data as it was, or train the run again" in proc.stderr
    assert not (tmp_path / "run" / "eval").exists()


def test_a_sort_by_column_that_was_not_scored_falls_back_to_one_that_was_and_says_so(tmp_path):
    """samplers=[gmm] with the default sort_by=val/fid_prior: sorted by val/fid_gmm, and summary.md says so."""
    rows = [{"run": f"{i}_job", "status": "ok", "model": "ae", "latent_dim": 2, "kl_weight": None,
             "overrides": [f"latent_dim={i}"], "val/fid_gmm": fid}
            for i, fid in enumerate([30.0, 10.0, 20.0])]  # fmt: skip
    ranked = report.write_report(tmp_path, rows, "val/fid_prior")
    assert [row["val/fid_gmm"] for row in ranked] == [10.0, 20.0, 30.0]
    summary = (tmp_path / "summary.md").read_text()
    assert "sort_by=val/fid_prior is no column of this report" in summary and "Sorted by `val/fid_gmm`" in summary
