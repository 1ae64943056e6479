import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoencoders.errors import UserError
from autoencoders.likelihoods import LIKELIHOODS
from autoencoders.losses import kl_divergence
from autoencoders.models import AE, VAE, minimised

MODELS = {"ae": (AE, "mlp"), "conv_ae": (AE, "conv"), "vae": (VAE, "mlp"), "conv_vae": (VAE, "conv")}
MODELS |= {"resnet_ae": (AE, "resnet"), "resnet_vae": (VAE, "resnet")}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_public_interface_shapes(name, shape):
    cls, arch = MODELS[name]
    model = cls(shape, latent_dim=4, arch=arch)
    x = torch.rand(5, *shape)
    assert model.encode(x).shape == (5, 4)
    for out in (model.reconstruct(x), model.sample(5), model.decode(torch.randn(5, 4))):
        assert out.shape == (5, *shape) and 0 <= out.min() and out.max() <= 1
    assert model.interpolate(x[:2], x[2:4], steps=8).shape == (2, 8, *shape)
    assert minimised(model.loss_terms(x)).shape == ()


def test_interpolation_ends_at_the_two_inputs():
    model = AE((1, 28, 28), latent_dim=3)
    x1, x2 = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    rows = model.interpolate(x1, x2, steps=9)
    torch.testing.assert_close(rows[:, 0], model.reconstruct(x1))
    torch.testing.assert_close(rows[:, -1], model.reconstruct(x2))


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 3, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(0.0, 1.0)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(kl_divergence(mu, logvar), monte_carlo, atol=0.02, rtol=0.01)
    assert torch.all(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_gradients_flow_through_the_reparameterization():
    model = VAE((1, 28, 28), latent_dim=4)
    minimised(model.loss_terms(torch.rand(8, 1, 28, 28))).backward()
    for p in model.encoder.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_elbo_is_negative_nats_per_image_and_sums_over_pixels():
    torch.manual_seed(0)
    model = VAE((1, 28, 28), latent_dim=4)
    x = torch.rand(6, 1, 28, 28)
    elbo = model.elbo(x)
    assert elbo.shape == (6,) and torch.all(elbo < 0)
    # an untrained decoder outputs ~0.5 everywhere: about 784 * log 2 nats of Bernoulli NLL per image
    assert 0.8 * 784 * math.log(2) < -elbo.mean() < 1.5 * 784 * math.log(2)
    logits = torch.zeros(2, 1, 28, 28)
    nll = LIKELIHOODS["bernoulli"].nll(logits, torch.ones_like(logits))
    torch.testing.assert_close(nll, torch.full((2,), 784 * math.log(2)))


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
def test_every_likelihood_trains_with_every_net_and_grids_show_its_mean(likelihood, arch):
    """The decoder outputs the likelihood's parameters (two per pixel for gaussian and logistic); decode returns the
    distribution's mean in [0, 1], and the loss is that likelihood's NLL of the input."""
    torch.manual_seed(0)
    model = VAE((3, 12, 10), latent_dim=3, arch=arch, likelihood=likelihood)
    x = (
        torch.bernoulli(torch.rand(4, 3, 12, 10))
        if likelihood == "bernoulli"
        else torch.randint(0, 256, (4, 3, 12, 10)) / 255
    )
    params = model.decoder(model.encode(x))
    assert params.shape == (4, 3 * LIKELIHOODS[likelihood].param_multiplier, 12, 10)
    mean = model.reconstruct(x)
    torch.testing.assert_close(mean, LIKELIHOODS[likelihood].mean(params))
    assert mean.shape == x.shape and 0 <= mean.min() and mean.max() <= 1
    minimised(model.loss_terms(x)).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_iwae_bound_is_at_least_the_elbo():
    torch.manual_seed(0)
    model = VAE((1, 28, 28), latent_dim=4)
    x = torch.rand(4, 1, 28, 28)
    elbo = torch.stack([model.elbo(x) for _ in range(200)]).mean(0)
    assert torch.all(model.log_likelihood(x, k=200) >= elbo)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ({"kl_warmup_epochs": 2}, [4.0 * min(1, step / 8) for step in range(12)]),  # linear over 2 epochs of 4 steps
        ({"kl_schedule": "constant"}, [4.0] * 12),
        ({"kl_schedule": "cyclic", "kl_cycles": 3}, [0.0, 2.0, 4.0, 4.0] * 3),  # 3 cycles of 4 steps: half a ramp
    ],
)
def test_the_kl_weight_follows_its_schedule_over_training_steps(schedule, expected):
    x = torch.rand(32, 1, 28, 28)
    loader = DataLoader(TensorDataset(x, torch.zeros(32)), batch_size=8)  # 4 steps per epoch
    model = VAE((1, 28, 28), latent_dim=2, kl_weight=4.0, **schedule)
    betas = []

    class RecordBeta(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(pl_module.kl_beta())

    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[RecordBeta()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    assert betas == pytest.approx(expected)
    assert VAE((1, 28, 28), kl_weight=4.0, **schedule).kl_beta() == 4.0  # outside training: the full weight


@pytest.mark.parametrize(  # each setting's range alone: tests/test_settings.py
    "kwargs,match",
    [
        ({"likelihood": "mse"}, "likelihood='mse'"),
        ({"kl_schedule": "constant", "kl_warmup_epochs": 3}, "constant` has no warm-up"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        VAE((1, 28, 28), **kwargs)
