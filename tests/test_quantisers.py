"""The quantised models' codes: FSQ's grid of levels, a VQ-VAE's codebook under DDP, and the priors over tokens."""

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from autoencoders.callbacks import BatchSeeds
from autoencoders.errors import UserError
from autoencoders.evaluation import evaluate
from autoencoders.models import FSQVAE, VAE, VQVAE
from autoencoders.models.vq import fsq_levels
from tests.helpers import ROOT, checkpoint_file

SHAPE = (1, 8, 8)


@pytest.mark.parametrize("levels", range(2, 9))
def test_fsq_leaves_its_priors_draws_as_drawn_and_its_encoder_reaches_every_level(levels):
    torch.manual_seed(0)
    model = FSQVAE(SHAPE, levels=levels, latent_dim=3, widths=[8]).eval()
    grid = fsq_levels(levels)
    assert torch.equal(model.quantize(grid), grid)
    draws = model.prior_sampler().fit(model.encode(torch.rand(20, *SHAPE))).draw(50, torch.Generator().manual_seed(0))
    assert torch.equal(model.quantize(draws), draws)
    torch.testing.assert_close(model.decode(draws), model.likelihood.mean(model.decoder(draws)), rtol=0, atol=0)

    model.encoder = torch.nn.Identity()  # the encoder's outputs: anything from -8 to 8
    codes = model.quantize(model.encode(torch.linspace(-8, 8, 3000).view(-1, 3)))
    assert torch.equal(codes.unique(), grid)


def test_fsq_refuses_level_counts_that_its_code_prior_cannot_serve():
    for levels in (257, 100_000):  # 100,000 levels trained, then scoring the samples tried to allocate 25.6 GB
        with pytest.raises(UserError, match=f"model.levels={levels} with latent_dim=16 is more than the code prior"):
            FSQVAE(SHAPE, levels=levels, latent_dim=16)
    FSQVAE(SHAPE, levels=256, latent_dim=16)  # the most it serves: 4096 numbers an image


class SaveCodebooks(L.Callback):
    """Saves each process's codebook, and how many vectors were revived, after every training step."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: VQVAE, outputs, batch, batch_idx: int) -> None:
        state = {"codebook": pl_module.codebook.detach().clone(), "revived": pl_module.revived}
        torch.save(state, self.folder / f"step{trainer.global_step}-rank{trainer.global_rank}.pt")


class RecordRevived(VQVAE):
    """A VQ-VAE that keeps its last training step's `revived`, for SaveCodebooks."""

    def loss_terms(self, x: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        terms = super().loss_terms(x, split)
        self.revived = terms.get("revived")
        return terms


@pytest.mark.parametrize("ema", [True, False])
def test_a_vq_vaes_codebook_draws_are_the_same_in_every_ddp_process_seeded_as_train_py_seeds_them(ema, tmp_path):
    """k-means at the first step and revival at the second draw at random; each process's global generator is
    seeded for its rank (BatchSeeds, as train.py), so the draws must not come from it unshared."""
    L.seed_everything(0)  # as train.py, before building the model
    # 32 vectors for 2 x 8 tokens a step: k-means repeats some, and the unused ones fall below revive_below at once
    model = RecordRevived(SHAPE, latent_dim=4, embedding_dim=2, codebook_size=32, widths=[8], ema=ema,
                          decay=0.5, revive_below=0.9)  # fmt: skip
    images = torch.rand(16, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(16)), batch_size=4)
    trainer = L.Trainer(strategy="ddp_fork", accelerator="cpu", devices=2, max_steps=2, logger=False,
                        callbacks=[BatchSeeds(0), SaveCodebooks(tmp_path)], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, loader)
    for step, revives in ((1, False), (2, True)):
        rank0, rank1 = (torch.load(tmp_path / f"step{step}-rank{rank}.pt") for rank in (0, 1))
        assert (rank0["revived"] > 0) == revives
        assert torch.equal(rank0["codebook"], rank1["codebook"]), (rank0["codebook"] - rank1["codebook"]).abs().max()


def evaluate_checkpoint(model: torch.nn.Module, tmp_path: Path, *overrides: str) -> dict[str, float]:
    """evaluate.py's scores of `model`, untrained, on the bundled digits' test split."""
    ckpt = checkpoint_file(model, tmp_path / "model.ckpt")
    settings = [f"ckpt_path={ckpt}", "data=mnist_subset", f"cache_dir={tmp_path / 'cache'}", "images.num_samples=4"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        (scores,) = evaluate(compose("evaluate", overrides=[*settings, *overrides]))
    return scores


@pytest.mark.slow  # fits a PixelCNN and a FID feature net: `pytest -m slow`
@pytest.mark.parametrize("cls", [VQVAE, FSQVAE])
def test_evaluate_py_fits_a_pixelcnn_to_a_quantised_models_tokens_and_scores_its_samples(cls, tmp_path):
    torch.manual_seed(0)
    own = {"embedding_dim": 2} if cls is VQVAE else {"levels": 4}
    overrides = ["samplers=[prior,pixelcnn]", "num_samples=50", "kid_subsets=5", "fid.epochs=1", "k=2"]
    scores = evaluate_checkpoint(cls((1, 28, 28), latent_dim=4, **own), tmp_path, *overrides)
    assert all(math.isfinite(scores[f"test/{m}_{s}"]) for m in ("fid", "kid") for s in ("prior", "pixelcnn"))
    assert len(list((tmp_path / "cache" / "samplers").glob("model_pixelcnn_*.pt"))) == 1


def test_a_model_with_continuous_codes_skips_the_pixelcnn_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        scores = evaluate_checkpoint(
            VAE((1, 28, 28), latent_dim=2), tmp_path, "samplers=[pixelcnn]", "num_samples=0", "k=2"
        )
    assert "No pixelcnn sampler for this VAE: it fits a prior over tokens (vqvae, fsq)" in caplog.text
    assert "test/recon" in scores and not (tmp_path / "cache" / "samplers").exists()
