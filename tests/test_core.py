"""The core that keeps numbers right and results kept: one decoding path for every model, likelihoods in fp32, bpd
only where it is a code length, the best checkpoint's own val metrics, and a run dir that is locked while it trains
and kept once training has started."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoencoders.callbacks import BestCheckpoint
from autoencoders.cli import FAILURE_FILE
from autoencoders.evaluation import reconstruction_metrics
from autoencoders.files import write_json
from autoencoders.likelihoods import LIKELIHOODS
from autoencoders.models import AE, IWAE, M2, MODELS, MSSSIMVAE, VAE, VQVAE
from autoencoders.models.adversarial import AdversarialTraining
from autoencoders.models.ae import CodePenaltyAE
from autoencoders.models.vq import Quantised
from tests.helpers import TINY, compose_train, hparams_plugin_route, run_train

SHAPE = (1, 8, 8)


def autoencoders_of_the_zoo() -> list[type[AE]]:
    bases = (CodePenaltyAE, AdversarialTraining, Quantised)  # the zoo's shared bases, no models of their own
    return [cls for cls in MODELS.values() if issubclass(cls, AE) and cls not in bases]


@pytest.mark.parametrize("cls", autoencoders_of_the_zoo(), ids=lambda c: c.__name__)
def test_training_and_evaluation_decode_through_one_path_with_the_same_recon_nll(cls):
    torch.manual_seed(0)
    own = {VQVAE: {"embedding_dim": 2}, M2: {"num_classes": 3}, MSSSIMVAE: {"scales": 2}}.get(cls, {})
    model = cls(SHAPE, latent_dim=4, **own)
    model.eval()
    images = (torch.rand(6, *SHAPE) < 0.5).to(torch.uint8) * 255
    x = images.float() / 255
    with torch.no_grad():
        evaluated = reconstruction_metrics(model, images, batch_size=4)
        direct = model.likelihood.nll(model.decoder_params(x), x).mean().item()
        if not isinstance(model, VAE):  # an AE's training recon is this very number; a VAE's is sampled
            trained = model.loss_terms(x, "val")["recon"].item()
            assert trained == pytest.approx(direct, rel=1e-5)
    if "recon" in evaluated:
        assert evaluated["recon"] == pytest.approx(direct, rel=1e-5)
    assert evaluated["mse"] == pytest.approx((model.reconstruct(x) - x).pow(2).mean().item(), rel=1e-5)


def test_a_vq_vae_decodes_its_quantised_codes_everywhere():
    torch.manual_seed(0)
    model = VQVAE(SHAPE, latent_dim=4, embedding_dim=2).eval()
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        quantised = model.decoder(model.quantize(model.encode(x)))
        assert torch.equal(model.decoder_params(x), quantised)
        assert not torch.equal(model.decoder(model.encode(x)), quantised)  # z_e is not what the decoder trains on


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_likelihoods_compute_in_fp32_whatever_dtype_comes_in(name):
    lik = LIKELIHOODS[name]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 4, 4)).float() / 255
    if name == "bernoulli":
        x = x.round()
    params = (3 * torch.randn(2, lik.param_multiplier, 4, 4)).bfloat16()
    # the same bf16 numbers, upcast by hand before anything is computed
    expected = lik.nll(params.float(), x)
    got = lik.nll(params, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert lik.mean(params).dtype == torch.float32


def test_bpd_is_reported_for_discrete_likelihoods_only():
    x = (torch.rand(2, *SHAPE) < 0.5).float()
    discrete = VAE(SHAPE, latent_dim=2, likelihood="bernoulli", nll_samples=3).test_terms(x)
    density = VAE(SHAPE, latent_dim=2, likelihood="gaussian", nll_samples=3).test_terms(x)
    assert {"nll", "nll_k", "bpd"} <= set(discrete) and discrete["nll_k"].item() == 3
    assert "bpd" not in density and "nll" in density


def test_iwae_is_chosen_on_its_own_bound():
    assert IWAE.selection == ("val/iwae", "max")
    assert VAE.selection == ("val/elbo", "max")


@pytest.mark.slow  # a train.py subprocess: `pytest -m slow`
def test_a_second_best_in_one_epoch_reports_its_own_val_metrics(tmp_path):
    """Validation twice an epoch: the second best replaces the first under the same file name."""
    run_dir = tmp_path / "run"
    run_train("model=ae", "latent_dim=2", "trainer.limit_train_batches=4", "+trainer.val_check_interval=2",
              "trainer.limit_val_batches=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith(BestCheckpoint.__name__)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/recon"] == pytest.approx(state["best_model_score"].item(), rel=1e-6)


def test_the_kl_warm_up_counts_optimizer_steps_under_gradient_accumulation():
    x = torch.rand(32, *SHAPE)
    loader = DataLoader(TensorDataset(x, torch.zeros(32)), batch_size=8)  # 4 batches: 2 optimizer steps an epoch
    model = VAE(SHAPE, latent_dim=2, kl_warmup_epochs=1)
    betas = []

    class RecordBeta(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(pl_module.kl_beta())

    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[RecordBeta()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader)
    assert betas == pytest.approx([0, 0, 0.5, 0.5, 1, 1, 1, 1])  # full weight after 1 epoch's 2 optimizer steps


@pytest.mark.slow  # a train.py subprocess: `pytest -m slow`
def test_a_second_process_cannot_train_in_a_locked_run_dir_and_is_told_the_pid(tmp_path):
    run_dir = tmp_path / "run"
    run_train("model=ae", "latent_dim=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
         "print('locked', flush=True); time.sleep(120)", str(run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_train("model=ae", "latent_dim=2", "trainer.max_epochs=2", "ckpt_path=last",
                         f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False, tiny=False)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"process {holder.pid} is training in it" in proc.stderr
    # SIGKILL released it: the resume now trains
    run_train("model=ae", "latent_dim=2", "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "trainer.accelerator=cpu", cwd=tmp_path, tiny=False)  # fmt: skip


@pytest.mark.slow  # a train.py subprocess: `pytest -m slow`
def test_a_failure_after_training_started_keeps_the_run_dir_with_the_error_in_train_log(tmp_path):
    proc = run_train("model=ae", "latent_dim=2", "optimizer=sgd", "optimizer.lr=1e12",
                     "callbacks.nan_guard.every_n_steps=1", "hydra.run.dir=run", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "error: The training loss became non-finite" in log
    (group,) = hparams_plugin_route(
        tmp_path / "run",
        "/session_groups",
        {"allowedStatuses": ["STATUS_FAILURE"], "startIndex": 0, "sliceSize": 10, "colParams": []},
    )["sessionGroups"]
    assert group["name"] == "run"  # TensorBoard's HParams tab lists the run as failed


def test_a_rerun_that_finishes_a_failed_job_removes_its_stale_failure_record(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / FAILURE_FILE, {"job": 0, "dir": str(run_dir), "error": "old"})  # as cli.py records it
    from autoencoders.training import train

    train(compose_train(run_dir, *TINY, "model=ae", "latent_dim=2"))
    assert (run_dir / "metrics.json").is_file() and not (run_dir / FAILURE_FILE).exists()


@pytest.mark.slow  # a train.py subprocess: `pytest -m slow`
def test_a_small_validation_split_still_logs_interpolations(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(90):  # val 9 images: 4 pairs, not 5 against 4
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(folder / f"{i}.png")
    run_train("data=image_folder", f"data.source.root={folder}", "model=ae", "latent_dim=2",
              "+callbacks.images.num_pairs=8", "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "run" / "metrics.json").is_file()
