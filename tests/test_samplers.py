"""Samplers fitted to codes recover the distribution the codes came from, and any autoencoder decodes their draws."""

import math

import pytest
import torch

from autoencoders.errors import UserError
from autoencoders.models import AE, VAE
from autoencoders.samplers import CodePrior, GaussianSampler, GMMSampler, Sampler, make_sampler


def test_the_gaussian_sampler_recovers_a_correlated_gaussian():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    cov = torch.tensor([[2.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 0.5]])
    codes = torch.distributions.MultivariateNormal(mean, cov).sample((20000,))
    draws = GaussianSampler(3).fit(codes).draw(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.T.cov(), cov, atol=0.08, rtol=0)


def test_the_gmm_sampler_recovers_the_weights_and_means_of_a_mixture():
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[-5.0, 0.0], [5.0, 3.0]])
    component = (torch.rand(6000, generator=generator) < 0.3).long()  # 30% from the second component
    codes = means[component] + 0.5 * torch.randn(6000, 2, generator=generator)
    sampler = GMMSampler(2, n_components=2).fit(codes)
    draws = sampler.draw(6000, torch.Generator().manual_seed(1))
    second = draws[:, 0] > 0
    assert second.float().mean().item() == pytest.approx(0.3, abs=0.03)
    torch.testing.assert_close(draws[second].mean(0), means[1], atol=0.1, rtol=0)
    torch.testing.assert_close(draws[~second].std(0), torch.tensor([0.5, 0.5]), atol=0.05, rtol=0)


def test_a_fitted_sampler_round_trips_through_its_state_and_a_generator_fixes_its_draws():
    codes = torch.randn(500, 4) @ torch.randn(4, 4)
    for name in ("prior", "gaussian", "gmm"):
        fitted = make_sampler(name, 4, n_components=3).fit(codes)
        restored = make_sampler(name, 4, n_components=3).load_state_dict(fitted.state_dict())
        first = fitted.draw(7, torch.Generator().manual_seed(5))
        assert first.shape == (7, 4) and first.dtype == torch.float32
        torch.testing.assert_close(restored.draw(7, torch.Generator().manual_seed(5)), first)


@pytest.mark.parametrize("cls", [AE, VAE])
def test_any_autoencoder_decodes_a_samplers_draws(cls):
    model = cls((1, 12, 12), latent_dim=3)
    codes = torch.randn(200, 3)
    for sampler in (None, Sampler(3), GaussianSampler(3).fit(codes), GMMSampler(3, n_components=2).fit(codes)):
        images = model.sample(5, torch.Generator().manual_seed(0), sampler=sampler)
        assert images.shape == (5, 1, 12, 12) and 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(model.sample(5, torch.Generator().manual_seed(0), sampler=sampler), images)
    assert not math.isclose(
        model.sample(1, torch.Generator().manual_seed(0)).sum().item(),
        model.sample(1, torch.Generator().manual_seed(0), sampler=GaussianSampler(3).fit(codes * 10 + 5)).sum().item(),
    )


def test_samplers_fit_codes_that_require_grad():
    """As in the README: `GMMSampler(...).fit(model.encode(x))`, outside torch.no_grad."""
    model = AE((1, 12, 12), latent_dim=4)
    codes = model.encode(torch.rand(50, 1, 12, 12))
    assert codes.requires_grad
    for sampler in (GaussianSampler(4), GMMSampler(4, n_components=2), CodePrior(torch.randn(3, 2), 2, epochs=1)):
        assert sampler.fit(codes).draw(3).shape == (3, 4)


def test_more_mixture_components_than_codes_is_a_clear_error():
    with pytest.raises(UserError, match=r"gmm_components=100000 .* 50 training codes(.|\n)*gmm_components<=50"):
        GMMSampler(2, n_components=100000).fit(torch.randn(50, 2))
