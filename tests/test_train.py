"""train.py end to end, as subprocesses on tiny configs."""

import io
import json
import logging
import math
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.model_summary import ModelSummary
from omegaconf import open_dict
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import autoencoders
from autoencoders.callbacks import ProgressBar
from autoencoders.data import ImageDataModule, MNISTSubset
from autoencoders.errors import UserError
from autoencoders.models import VAE
from autoencoders.rundirs import RunDirGuard, run_name
from autoencoders.training import build
from tests.helpers import ROOT, TINY, compose_train, hparams_plugin_route, run_script, run_train


def event_tags(run_dir) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return {**acc.Tags(), "hparams": acc.PluginTagToContent("hparams")}


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    run_train("model=vae", "latent_dim=2", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


def test_run_dir_holds_pictures_of_the_final_weights(vae_run):
    """28x28 images in grids with 2-pixel borders: 16 validation images above their reconstructions, 8x8 prior
    samples, 8 interpolations of 10 steps, a traversal of each of the 2 code dims in 10 steps, the decoded 15x15
    manifold, and charts of the 2-d codes and of the KL per dimension."""
    pictures = vae_run / "pictures"
    sizes = {p.name: Image.open(p).size for p in pictures.glob("*.png")}
    side = lambda n: 2 + 30 * n  # noqa: E731
    assert sizes == {
        "reconstructions.png": (side(16), side(2)), "samples.png": (side(8), side(8)),
        "interpolations.png": (side(10), side(8)), "traversal.png": (side(10), side(2)), "scatter.png": (500, 500),
        "manifold.png": (side(15), side(15)), "kl_per_dim.png": (500, 500),
    }  # fmt: skip
    reconstructions = np.asarray(Image.open(pictures / "reconstructions.png").convert("L"), dtype=float)
    assert reconstructions[2:30].std() > 0 and reconstructions[32:60].std() > 0  # digits, not blank rows


def test_the_readme_shows_one_picture_of_each_kind_a_run_writes(vae_run):
    shown = re.findall(r"\(\.\./pictures/([a-z_]+\.png)\)", (ROOT / "docs" / "guides" / "train.md").read_text())
    assert sorted(shown) == sorted(p.name for p in (vae_run / "pictures").glob("*.png"))  # a 2-d VAE writes all
    assert all(Image.open(ROOT / "docs" / "pictures" / name).size[0] > 100 for name in shown)


def test_run_dir_holds_config_checkpoints_and_metrics(vae_run):
    assert (vae_run / ".hydra" / "config.yaml").is_file()
    assert (vae_run / "checkpoints" / "last.ckpt").is_file()
    assert list((vae_run / "checkpoints").glob("best-epoch*.ckpt"))
    metrics = json.loads((vae_run / "metrics.json").read_text())
    for key in ("val/loss", "val/elbo", "val/kl", "val/recon", "test/loss", "test/elbo", "test/nll", "test/bpd"):
        assert key in metrics
    assert metrics["test/elbo"] < 0  # a log-likelihood bound, in nats per image
    assert 0 < metrics["test/nll"] < -metrics["test/elbo"] + 1  # IWAE: a tighter bound than the ELBO
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (784 * math.log(2)))
    # the MNIST default follows the literature: a Bernoulli likelihood on dynamically binarised digits
    hparams = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["likelihood"] == "bernoulli"


def test_the_console_ends_with_the_run_dir_and_a_table_of_val_and_test_metrics(vae_run):
    log = (vae_run / "train.log").read_text()  # what the console showed, as Hydra logs it
    assert f"Run dir: {vae_run}" in log
    table = log[log.index("in metrics.json:") :].splitlines()[1:]
    assert table[0].split() == ["metric", "val", "test"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:] if line.startswith("  ")}
    metrics = json.loads((vae_run / "metrics.json").read_text())
    assert float(rows["elbo"][0]) == pytest.approx(metrics["val/elbo"], rel=1e-5)
    assert float(rows["elbo"][1]) == pytest.approx(metrics["test/elbo"], rel=1e-5)
    assert rows["nll"] == [f"{metrics['test/nll']:.6g}"]  # a test-only metric: one cell, in the test column
    assert len(next(line for line in table if line.split()[0] == "nll")) == len(table[0])
    for noise in ("Tip: For seamless cloud logging", "LeafSpec", "smaller than the logging interval"):
        assert noise not in log


def test_the_progress_bar_shows_the_training_loss_and_the_selection_metric(tmp_path):
    model = VAE((1, 28, 28), latent_dim=2)
    data = ImageDataModule(MNISTSubset(os.environ["AUTOENCODERS_CACHE"]), labels_per_class=3, batch_size=10)
    bar = ProgressBar()
    trainer = L.Trainer(
        max_epochs=2, limit_val_batches=1, logger=False, enable_checkpointing=False, callbacks=[bar],
        default_root_dir=tmp_path, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    assert bar.progress.tasks[bar.train_progress_bar_id].description.endswith("Epoch 2/2")  # not Lightning's "1/1"
    assert ModelSummary(model).total_flops > 1e6  # the summary printed before training, not "Total FLOPs: 0"
    shown = bar.get_metrics(trainer, model)
    assert float(shown["loss"]) > 0 and float(shown["val/elbo"]) == pytest.approx(
        trainer.callback_metrics["val/elbo"].item(), rel=1e-3
    )


def test_the_best_checkpoint_is_chosen_on_val_elbo_and_metrics_json_reports_its_own_val_metrics(tmp_path):
    """With a KL warm-up the weighted val/loss is lowest in early epochs; the choice is made on val/elbo instead, and
    metrics.json holds the validation metrics of the very checkpoint that is tested."""
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_epochs=4", "trainer.limit_train_batches=4", "model.kl_warmup_epochs=3"]
    run_train(*overrides, "latent_dim=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    elbo = {(e.step + 1) // 4 - 1: e.value for e in acc.Scalars("val/elbo")[:4]}  # epoch -> val/elbo at its end
    best_epoch = max(elbo, key=elbo.get)
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert best.name == f"best-epoch{best_epoch:03d}.ckpt"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/elbo"] == pytest.approx(elbo[best_epoch])
    states = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    ((key, selection),) = ((key, state) for key, state in states.items() if key.startswith("BestCheckpoint"))
    assert "'monitor': 'val/elbo', 'mode': 'max'" in key
    assert selection["best_model_score"].item() == pytest.approx(elbo[best_epoch])


def test_tensorboard_holds_the_pictures_with_their_descriptions_the_config_and_no_epoch_chart(vae_run):
    tags = event_tags(vae_run)
    pictures = {"visual/reconstructions", "visual/samples", "visual/interpolations", "visual/scatter"}
    pictures |= {"visual/traversal", "visual/manifold", "visual/kl_per_dim"}
    assert pictures <= set(tags["images"])
    assert {"train/loss_epoch", "val/loss", "val/elbo", "verdict/val/elbo", "verdict/test/nll"} <= set(tags["scalars"])
    assert "epoch" not in tags["scalars"] and "test/nll" not in tags["scalars"]  # Lightning's epoch; verdict/test/nll
    acc = EventAccumulator(str(vae_run), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    description = acc.SummaryMetadata("visual/traversal").summary_description
    assert description.startswith("One row per code dimension (VAEs: in order of KL")
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    model:\n      _target_: autoencoders.models.VAE" in config  # a markdown code block
    hparams = yaml.safe_load((vae_run / "hparams.yaml").read_text())
    assert hparams["model"] == "vae" and hparams["latent_dim"] == 2 and len(hparams) > 30  # in full


def test_the_hparams_tab_of_a_run_opens_on_its_selection_and_test_metrics_and_names_it(vae_run):
    experiment = hparams_plugin_route(vae_run, "/experiment", {})
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metrics == ["verdict/val/elbo", "verdict/test/nll"]  # TensorBoard ticks the first five: these
    (group,) = hparams_plugin_route(vae_run, "/session_groups", {
        "allowedStatuses": ["STATUS_SUCCESS"], "startIndex": 0, "sliceSize": 10,
        "colParams": [{"metric": {"tag": "verdict/val/elbo", "group": ""}}]})["sessionGroups"]  # fmt: skip
    assert group["name"] == vae_run.name and group["sessions"][0]["status"] == "STATUS_SUCCESS"
    best = {v["name"]["tag"]: v["value"] for v in group["metricValues"]}
    metrics_json = json.loads((vae_run / "metrics.json").read_text())
    assert best["verdict/val/elbo"] == pytest.approx(metrics_json["val/elbo"])


def test_load_returns_the_trained_model(vae_run):
    model = autoencoders.load(vae_run / "checkpoints" / "last.ckpt")
    assert isinstance(model, VAE) and model.latent_dim == 2
    assert model.sample(3).shape == (3, 1, 28, 28)
    elbo = model.elbo(torch.rand(2, 1, 28, 28))  # for inference: no torch.no_grad() needed
    assert elbo.shape == (2,) and not elbo.requires_grad
    with pytest.raises(UserError, match=r"is a folder, not a checkpoint file; it holds checkpoints/best-epoch"):
        autoencoders.load(vae_run)  # a run dir, not "does not exist"


def test_conv_ae_with_larger_latent_uses_the_embedding_projector(tmp_path):
    run_train("model=conv_ae", "latent_dim=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert (tmp_path / "run" / "projector_config.pbtxt").is_file()
    assert "visual/scatter" not in event_tags(tmp_path / "run")["images"]


def test_images_are_logged_every_n_epochs_and_after_the_last(tmp_path):
    run_dir = tmp_path / "run"
    run_train("trainer.max_epochs=4", "images_every_n_epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    steps_per_epoch = 2  # TINY's limit_train_batches; an epoch's values sit at the step of its last batch
    assert [(e.step + 1) // steps_per_epoch - 1 for e in acc.Images("visual/samples")] == [0, 2, 3]
    samples = Image.open(io.BytesIO(acc.Images("visual/samples")[-1].encoded_image_string))
    assert (samples.mode, samples.size) == ("L", (8 * 30 + 2, 8 * 30 + 2))  # grey digits: 8 x 8, 2 px padding


@pytest.mark.parametrize(
    "override,message",
    [
        ("latent_dim=0", "latent_dim=0"),  # the other bad values: test_reliability's in-process BAD_INPUT table
        ("model=nope", "model"),
        ("data=nope", "data"),
    ],
)
def test_bad_input_is_a_clear_error_with_nonzero_exit(tmp_path, override, message):
    proc = run_train(override, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/runs/*"))  # a rejected command leaves no run dir behind


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("value", ["/x/my run ü", "a,b[c"])
def test_an_unquoted_value_that_hydra_cannot_read_is_refused_saying_how_to_quote_it(tmp_path, script, value):
    key = "hydra.run.dir" if script == "train.py" else "run_dir"
    proc = run_script(script, f"{key}={value}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "LexerNoViableAlt" not in proc.stderr
    assert proc.stderr.startswith("error: ") and f"\"{key}='{value}'\"" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before Hydra made a run dir


def test_two_runs_started_in_the_same_second_get_a_dir_each(tmp_path, monkeypatch):
    """Default run dirs are named to the second; the second claimant of a name gets -2, and neither shares."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        configs = [compose("train", ["model=ae", "+data.source.root=/a/b/c"], return_hydra_config=True) for _ in "ab"]
    dirs, name = [], configs[0].hydra.run.dir  # one name for both, as for two commands started in the same second
    for config in configs:
        with open_dict(config):
            config.hydra.run.dir = name
        RunDirGuard().on_run_start(config)
        dirs.append(Path(config.hydra.run.dir))
    assert dirs[0].name.endswith("_data.source.root-c_model-ae")  # a path-valued setting: by its last part
    assert dirs[1] == dirs[0].with_name(dirs[0].name + "-2") and all(d.is_dir() for d in dirs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("outputs"),
        Path("outputs/runs"),
        *dirs,
    ]


@pytest.mark.slow  # end to end, over 10 s: `pytest -m slow`, which CI runs
def test_seed_makes_runs_reproducible_including_seed_zero(tmp_path):
    run_train("-m", "model=ae", "latent_dim=2", "seed=0,0,1", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    runs = sorted(tmp_path.glob("*_seed-*"))
    first, again, other = (json.loads((run / "metrics.json").read_text()) for run in runs)
    assert first == again
    assert first["test/recon"] != other["test/recon"]


@pytest.mark.slow
def test_compile_trains_the_same_model_and_saves_plain_checkpoints(tmp_path):
    runs = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    for name, run_dir in runs.items():
        run_train(
            "model=conv_ae", "latent_dim=2", f"compile={name == 'compiled'}", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
    eager, compiled = (json.loads((run / "metrics.json").read_text()) for run in runs.values())
    assert compiled["test/recon"] == pytest.approx(eager["test/recon"], rel=1e-3)
    model = autoencoders.load(runs["compiled"] / "checkpoints" / "last.ckpt")  # no torch.compile prefixes
    assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 2)


def test_run_dir_names_keep_a_values_sign_and_drop_what_a_command_line_cannot_take():
    names = {value: run_name([f"kl_weight={value}"]) for value in ("0.5", "-0.5")}
    assert names == {"0.5": "_kl_weight-0.5", "-0.5": "_kl_weight--0.5"}
    assert run_name(["model.widths=[64,32]", "hydra.run.dir=x", "ckpt_path=last"]) == "_model.widths-64-32"


def test_sweep_job_names_leave_out_the_overrides_every_job_shares(tmp_path):
    """What `train.py -m model=ae,vae seed=-1,1 latent_dim=2` names its jobs, from the multirun.yaml that Hydra's
    sweeper writes before it launches them."""
    command = ["model=ae,vae", "seed=-1,1", "latent_dim=2"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": command}}}))
    job = ["model=vae", "seed=-1", "latent_dim=2"]
    assert run_name(job, str(tmp_path)) == "_model-vae_seed--1"
    assert run_name(job, str(tmp_path / "elsewhere")) == "_latent_dim-2_model-vae_seed--1"  # no record: every override


@pytest.mark.parametrize("model,says", [("ae", True), ("m2", False)])
def test_an_autoencoder_on_a_labelled_subset_says_how_few_images_it_trains_on(tmp_path, caplog, model, says):
    """data.labels_per_class is for few-label models; an autoencoder, which uses no labels, trains on the subset only:
    the console says so (a semi-supervised model such as M2 trains on every image, so it says nothing)."""
    cfg = compose_train(tmp_path / "run", *TINY, f"model={model}", "latent_dim=2", "data.labels_per_class=3")
    with caplog.at_level(logging.WARNING, logger="autoencoders.training"):
        datamodule, _ = build(cfg)
    said = [r.getMessage() for r in caplog.records if "labelled images" in r.getMessage()]
    everything = len(datamodule.unlabelled_set)
    expected = f"trains on 30 labelled images (data.labels_per_class=3) of the {everything} training images; drop"
    assert [expected in line for line in said] == ([True] if says else [])
