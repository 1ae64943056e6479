"""train.py end to end, as subprocesses on tiny configs."""

import io
import json
import math

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import autoencoders
from autoencoders.models import VAE
from tests.helpers import run_train


def event_tags(run_dir) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return {**acc.Tags(), "hparams": acc.PluginTagToContent("hparams")}


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    run_train("model=vae", "latent_dim=2", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


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


def test_tensorboard_holds_the_image_summaries_and_hparams(vae_run):
    tags = event_tags(vae_run)
    assert {"images/reconstructions", "images/samples", "images/interpolations", "latent/scatter"} <= set(
        tags["images"]
    )
    assert {"train/loss_epoch", "val/loss", "val/elbo"} <= set(tags["scalars"])
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(tags["hparams"])


def test_load_returns_the_trained_model(vae_run):
    model = autoencoders.load(vae_run / "checkpoints" / "last.ckpt")
    assert isinstance(model, VAE) and model.latent_dim == 2
    assert model.sample(3).shape == (3, 1, 28, 28)
    with torch.no_grad():
        assert model.elbo(torch.rand(2, 1, 28, 28)).shape == (2,)


def test_conv_ae_with_larger_latent_uses_the_embedding_projector(tmp_path):
    run_train("model=conv_ae", "latent_dim=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert (tmp_path / "run" / "projector_config.pbtxt").is_file()
    assert "latent/scatter" not in event_tags(tmp_path / "run")["images"]


def test_images_are_logged_every_n_epochs_and_after_the_last(tmp_path):
    run_dir = tmp_path / "run"
    run_train("trainer.max_epochs=4", "images_every_n_epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    steps_per_epoch = 2  # TINY's limit_train_batches
    assert [e.step // steps_per_epoch for e in acc.Images("images/samples")] == [1, 3, 4]  # after epochs 0, 2, 3
    samples = Image.open(io.BytesIO(acc.Images("images/samples")[-1].encoded_image_string))
    assert (samples.mode, samples.size) == ("L", (8 * 30 + 2, 8 * 30 + 2))  # grey digits: 8 x 8, 2 px padding


def test_multirun_sweep_runs_one_named_job_per_combination(tmp_path):
    run_train("-m", "model=ae,vae", "latent_dim=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 2
    assert runs[0].startswith("0_") and "latent_dim=2,model=ae" in runs[0]
    assert runs[1].startswith("1_") and "latent_dim=2,model=vae" in runs[1]


@pytest.mark.parametrize(
    "override,message",
    [
        ("latent_dim=0", "latent_dim=0"),
        ("latent_dim=-4", "latent_dim=-4"),
        ("kl_weight=-1", "kl_weight=-1"),
        ("compile=maybe", "compile=maybe"),
        ("images_every_n_epochs=0", "images_every_n_epochs=0"),
        ("model=nope", "model"),
        ("data=nope", "data"),
    ],
)
def test_bad_input_is_a_clear_error_with_nonzero_exit(tmp_path, override, message):
    proc = run_train(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_seed_makes_runs_reproducible_including_seed_zero(tmp_path):
    run_train("-m", "model=ae", "latent_dim=2", "seed=0,0,1", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    runs = sorted(tmp_path.glob("*_*seed=*"))
    first, again, other = (json.loads((run / "metrics.json").read_text()) for run in runs)
    assert first == again
    assert first["test/loss"] != other["test/loss"]


@pytest.mark.slow
def test_compile_trains_the_same_model_and_saves_plain_checkpoints(tmp_path):
    runs = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    for name, run_dir in runs.items():
        run_train(
            "model=conv_ae", "latent_dim=2", f"compile={name == 'compiled'}", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
    eager, compiled = (json.loads((run / "metrics.json").read_text()) for run in runs.values())
    assert compiled["test/loss"] == pytest.approx(eager["test/loss"], rel=1e-3)
    model = autoencoders.load(runs["compiled"] / "checkpoints" / "last.ckpt")  # no torch.compile prefixes
    assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 2)
