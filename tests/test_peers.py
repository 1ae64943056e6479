"""benchmarks/peers.py's comparison is of like with like: pythae's default VAE is our MLP VAE, scored alike. Needs the
bench extra (pip install -e ".[bench]"), so it is skipped where pythae is not installed, as in CI."""

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT

pythae_models = pytest.importorskip("pythae.models")
from pythae.data.datasets import DatasetOutput  # noqa: E402


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("peers")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_pythae_default_vae_with_our_weights_is_our_vae(peers, tmp_path):
    datamodule, ours = peers.initial_model(peers.OVERRIDES, tmp_path)
    config = pythae_models.VAEConfig(input_dim=datamodule.image_shape, latent_dim=16, reconstruction_loss="bce")
    theirs = pythae_models.VAE(config)
    theirs.load_state_dict(peers.pythae_weights(ours))  # strict: every layer's name and shape match
    x = datamodule.inputs("train")[:64]
    torch.manual_seed(0)
    their_loss = theirs(DatasetOutput(data=x)).loss
    torch.manual_seed(0)
    assert their_loss.item() == pytest.approx(ours.loss_terms(x)["loss"].item(), rel=1e-5)

    def their_encoder(images):
        code = theirs.encoder(images)
        return code.embedding, code.log_covariance

    test = datamodule.inputs("test")[:100]
    their_bounds = peers.test_bounds(
        their_encoder, lambda z: peers.bernoulli_logits(theirs.decoder(z).reconstruction), test, samples=5
    )
    assert their_bounds == pytest.approx(peers.test_bounds(ours.posterior, ours.decoder, test, samples=5), rel=1e-5)


def test_bernoulli_logits_score_probabilities_as_pythae_loss_does(peers):
    p = torch.tensor([0.0, 1e-30, 0.2, 0.5, 1 - 1e-7, 1.0]).repeat(2)
    x = torch.tensor([0.0, 1.0]).repeat_interleave(6)
    expected = F.binary_cross_entropy(p, x, reduction="none")  # pythae's bce; wrong and saturated: 100 nats
    logits = peers.bernoulli_logits(p)
    assert torch.allclose(F.binary_cross_entropy_with_logits(logits, x, reduction="none"), expected, atol=1e-4)


@pytest.mark.slow
def test_quick_run_reports_both_pipelines(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--threads", "1", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["comparison"]["pythae/this s/epoch (median)"] > 0 and report["seeds"] == [0]
    assert all(
        -1000 < figures["test ELBO (mean)"] <= figures["test IWAE (mean)"] < 0 for figures in report["results"].values()
    )
