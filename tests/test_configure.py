"""The config groups users know from Lightning + Hydra (logger, callbacks, optimizer, scheduler), structured configs,
and the HParams tab of a sweep as TensorBoard's own hparams plugin serves it."""

import contextlib
import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from autoencoders.cli import user_error
from autoencoders.loggers import build_loggers
from autoencoders.training import build, build_callbacks, train
from tests.helpers import ROOT, TINY, compose_train, hparams_plugin_route, run_train

README = (ROOT / "docs" / "guides" / "tensorboard-and-reports.md").read_text()  # the docs' table of tags


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.fixture(scope="module")
def every_logger(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("loggers") / "run"
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        train(compose_train(run_dir, *TINY, "latent_dim=2", "logger=[tensorboard,csv,wandb,mlflow]"))
    (run_dir.parent / "stderr.txt").write_text(console.getvalue())
    return run_dir


def test_tensorboard_writes_events_with_scalars_and_images(every_logger):
    acc = EventAccumulator(str(every_logger), size_guidance={"images": 0})
    acc.Reload()
    assert {"val/elbo", "verdict/test/nll"} <= set(acc.Tags()["scalars"])
    assert {"visual/samples", "visual/scatter"} <= set(acc.Tags()["images"])


def test_csv_writes_metrics_csv_and_the_hparams(every_logger):
    metrics = json.loads((every_logger / "metrics.json").read_text())
    rows = csv_rows(every_logger)
    assert logged(rows, "val/elbo")[-1] == pytest.approx(metrics["val/elbo"], rel=1e-6)
    assert logged(rows, "test/nll") == [pytest.approx(metrics["test/nll"], rel=1e-6)]
    assert "model: vae" in (every_logger / "csv" / "version_0" / "hparams.yaml").read_text()


def test_wandb_writes_an_offline_run_with_the_metrics_and_the_image_grids(every_logger):
    (run,) = (every_logger / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")  # what `wandb sync` uploads: records holding each value as JSON
    metrics = json.loads((every_logger / "metrics.json").read_text())
    for key in ("val/elbo", "test/nll"):
        assert key.encode() in log.read_bytes() and json.dumps(metrics[key]).encode() in log.read_bytes()
    assert list((run / "files" / "media" / "images" / "visual").glob("samples_*.png"))


def test_wandb_warns_of_nothing_the_user_cannot_act_on(every_logger):
    assert "wandb: WARNING" not in (every_logger.parent / "stderr.txt").read_text()


def test_mlflow_writes_a_file_store_that_mlflow_reads_back(every_logger):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{every_logger / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("autoencoders").experiment_id])
    assert run.info.run_name == every_logger.name and run.info.status == "FINISHED"
    metrics = json.loads((every_logger / "metrics.json").read_text())
    assert run.data.metrics["test/nll"] == pytest.approx(metrics["test/nll"])
    assert run.data.params["model"] == "vae" and run.data.params["latent_dim"] == "2"
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith("images/visual_samples") for path in images)


def test_a_logger_whose_package_is_missing_is_an_error_naming_the_install(monkeypatch, tmp_path):
    import importlib.util

    cfg = compose_train(tmp_path / "run", "logger=wandb")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    with pytest.raises(Exception) as raised:
        build_loggers(cfg.logger, "run")
    assert 'pip install -e ".[wandb]"' in str(user_error(raised.value))


def test_callbacks_are_added_and_dropped_from_the_command_line_with_the_models_selection_filled_in(tmp_path):
    cfg = compose_train(tmp_path, "model=ae", "+callbacks=[early_stopping,lr_monitor]", "~callbacks.images")
    callbacks = {type(c).__name__: c for c in build_callbacks(cfg.callbacks, ("val/recon", "min"))}
    assert "ImageLogger" not in callbacks and {"EarlyStopping", "LearningRateMonitor", "BestCheckpoint"} <= set(
        callbacks
    )
    assert (callbacks["EarlyStopping"].monitor, callbacks["BestCheckpoint"].monitor) == ("val/recon", "val/recon")


def test_early_stopping_stops_when_the_selection_metric_stops_improving(tmp_path):
    # a learning rate too small to move any weight: val/recon never improves after the first epoch
    cfg = compose_train(
        tmp_path, *TINY, "model=ae", "latent_dim=2", "optimizer.lr=1e-30", "trainer.max_epochs=20",
        "+callbacks=early_stopping", "callbacks.early_stopping.patience=2", "logger=csv",
    )  # fmt: skip
    train(cfg)
    assert len(logged(csv_rows(tmp_path), "val/recon")) == 3  # the best epoch and 2 without improvement


def test_device_stats_logs_the_devices_stats(tmp_path):
    train(compose_train(tmp_path, *TINY, "model=ae", "latent_dim=2", "+callbacks=device_stats", "logger=csv",
                        "trainer.log_every_n_steps=1"))  # fmt: skip
    assert logged(csv_rows(tmp_path), "DeviceStatsMonitor.on_train_batch_end/cpu_percent")


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau"])
def test_each_scheduler_changes_the_learning_rate_as_lr_monitor_reads_it(scheduler, tmp_path):
    overrides = ["trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=1"]
    if (
        scheduler == "plateau"
    ):  # a val/recon that cannot improve: the rate halves after each epoch but the first (eps=0:
        # torch skips smaller changes than eps)
        overrides += ["optimizer.lr=1e-30", "scheduler.scheduler.patience=0", "+scheduler.scheduler.eps=0"]
    cfg = compose_train(
        tmp_path, *TINY, "model=ae", "latent_dim=2", f"scheduler={scheduler}", "+callbacks=lr_monitor", "logger=csv",
        *overrides,
    )  # fmt: skip
    train(cfg)
    rates = logged(csv_rows(tmp_path), "lr-Adam")
    if scheduler == "plateau":
        assert rates == [1e-30, 1e-30, 5e-31]  # logged at each epoch's start
    else:
        assert len(rates) == 12 and max(rates) == pytest.approx(1e-3, rel=0.05)  # one per step, peaking at lr
        assert rates[0] < max(rates) and rates[-1] < max(rates) / 10  # a warm-up, and a decay nearly to 0


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                           ("sgd", torch.optim.SGD)])  # fmt: skip
def test_the_optimizer_group_builds_the_optimizer_with_the_models_parameters(name, cls, tmp_path):
    _, model = build(compose_train(tmp_path, f"optimizer={name}", "optimizer.lr=0.25"))
    optimizer = model.configure_optimizers()
    assert type(optimizer) is cls and optimizer.param_groups[0]["lr"] == 0.25
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("model", "loss"), [("ae", "recon"), ("vqvae", "loss")])
def test_sgd_trains_the_default_models_with_its_default_settings(model, loss, tmp_path):
    """Losses are summed over pixels (about 200 nats per image), so SGD at a rate made for per-pixel means diverges
    (lr 1e-2 did: the VQ-VAE's loss became infinite at step 78)."""
    default_schedule = "scheduler.scheduler.total_steps=1600"  # these are the first 96 steps of the default 50 epochs
    train(compose_train(tmp_path, *TINY, f"model={model}", "optimizer=sgd", "scheduler=cosine", default_schedule,
                        "logger=csv", "trainer.limit_train_batches=null", "trainer.max_epochs=3",
                        "trainer.log_every_n_steps=1"))  # fmt: skip
    losses = logged(csv_rows(tmp_path), f"train/{loss}_step")
    assert len(losses) == 96 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


@pytest.mark.parametrize("override", ["compile=maybe", "model.widths=[a]"])
def test_hydra_rejects_a_value_of_the_wrong_type_naming_it_before_importing_torch(override, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), override], cwd=tmp_path, capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    key, value = override.split("=")
    assert f"Error merging override {override}" in proc.stderr and f"full_key: {key}" in proc.stderr
    assert not re.search(r"\|\s+torch$", proc.stderr, re.MULTILINE)  # -X importtime lists every module imported
    assert not (tmp_path / "outputs").exists()


# The HParams tab -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    """The same 4-job sweep, an AE and a VAE with latent sizes 2 and 3, in both job orders."""
    root = tmp_path_factory.mktemp("hparams")
    orders = {"ae_first": ["model=ae,vae", "latent_dim=2,3"], "vae_first": ["model=vae,ae", "latent_dim=3,2"]}
    for name, overrides in orders.items():
        run_train("-m", *overrides, f"hydra.sweep.dir={root / name}", cwd=root)
    return {name: root / name for name in orders}


@pytest.mark.parametrize("order", ["ae_first", "vae_first"])
def test_the_hparams_tab_of_a_sweep_has_the_selection_metrics_and_the_differing_hparams(sweeps, order):
    experiment = hparams_plugin_route(sweeps[order], "/experiment", {"hparamsLimit": 2})
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    # The tab ticks the first five and colours parallel coordinates by the first: the selected checkpoints' recon
    # (the AE's selection metric, which the VAE has too), so no run drops out, then the VAE's, whoever came first.
    assert metrics == ["verdict/val/recon", "verdict/test/recon", "verdict/val/elbo", "verdict/test/nll"]
    groups = hparams_plugin_route(sweeps[order], "/session_groups", {
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE"], "startIndex": 0, "sliceSize": 10,
        "colParams": [{"metric": {"tag": name, "group": ""}} for name in metrics[:5]]})["sessionGroups"]  # fmt: skip
    shared = set(metrics[:2])  # every run has a value in the AE's columns, the VAE's recon too
    assert len(groups) == 4 and all(shared <= {v["name"]["tag"] for v in group["metricValues"]} for group in groups)
    jobs = sorted(path.name for path in sweeps[order].glob("*_model-*"))
    assert sorted(group["name"] for group in groups) == jobs  # each row named by its run dir
    assert {session["status"] for group in groups for session in group["sessions"]} == {"STATUS_SUCCESS"}
    assert sorted((h["name"], h["differs"]) for h in experiment["hparamInfos"]) == [
        ("latent_dim", True),
        ("model", True),
    ]  # fmt: skip  (the first two of a limit: the ones that differ)

    every = hparams_plugin_route(sweeps[order], "/experiment", {})["hparamInfos"]  # the tab ticks five: none else
    strings = [("latent_dim", "DATA_TYPE_STRING"), ("model", "DATA_TYPE_STRING")]  # latent_dim: 2, not 2.0000
    assert sorted((h["name"], h["type"]) for h in every) == strings


def test_the_hparams_tab_shows_null_booleans_and_lists_as_what_they_are(sweeps):
    groups = hparams_plugin_route(
        sweeps["ae_first"], "/session_groups",
        {"allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"], "startIndex": 0, "sliceSize": 10,
         "colParams": [{"hparam": "model"}, {"metric": {"tag": "verdict/val/elbo", "group": ""}}]},
    )["sessionGroups"]  # fmt: skip
    assert len(groups) == 4
    for group in groups:
        hparams = group["hparams"]
        assert hparams["model.widths"] == "null" and hparams["compile"] is False and hparams["model"] in ("ae", "vae")
        assert hparams["trainer.devices"] == "1" and "ckpt_path" not in hparams  # an integer as text: 1, not 1.0000
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert ("verdict/val/elbo" in values) == (hparams["model"] == "vae")  # each run's own metrics, none invented


def scalar_and_image_tags(run_dir: Path) -> dict[str, list[int]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return steps | {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_each_curve_has_one_point_per_step_and_images_share_their_epochs_step(sweeps):
    for run_dir in sweeps["ae_first"].glob("*_model-*"):
        steps = scalar_and_image_tags(run_dir)
        for tag, at in steps.items():
            if tag != "epoch":  # Lightning's own, written with every logging call
                assert len(at) == len(set(at)), tag
        assert steps["visual/samples"] == steps["val/recon"]  # TINY: one epoch, images after the last


def readme_tags() -> dict[str, set[str]]:
    """README's table of TensorBoard tags: model -> the tags it lists for it."""
    section = README[README.index("| tag | written | models |") : README.index("<!-- end of tags -->")]
    tags: dict[str, set[str]] = {}
    for row in section.splitlines()[2:]:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]  # at | but not at \\|
        for model in cells[2].split(", "):
            tags.setdefault(model, set()).update(re.findall(r"`([^`]+)`", cells[0]))
    return tags


def test_the_readme_lists_exactly_the_tags_a_run_writes(sweeps):
    listed = readme_tags()
    for model in ("ae", "vae"):
        (run_dir,) = sweeps["ae_first"].glob(f"*_latent_dim-2_model-{model}")  # latent_dim 2: with visual/scatter
        assert set(scalar_and_image_tags(run_dir)) == listed[model.upper()], model
