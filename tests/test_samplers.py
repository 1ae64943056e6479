"""Samplers fitted to codes recover the distribution the codes came from, and any autoencoder decodes their draws."""

import io
import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from autoencoders.errors import UserError
from autoencoders.metrics import metric_key
from autoencoders.models import AE, VAE
from autoencoders.samplers import (
    SAMPLERS,
    CodePrior,
    GaussianSampler,
    GMMSampler,
    MAFSampler,
    Sampler,
    TwoStageSampler,
    make_sampler,
)

CORRELATED_MEAN = torch.tensor([1.0, -2.0, 0.5])
CORRELATED_COV = torch.tensor([[2.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 0.5]])


def banana(n: int, seed: int) -> torch.Tensor:
    """(n, 2) points (a, a^2/2 - 1 + 0.3 b), a and b standard normal: a curved ridge no Gaussian fits."""
    a, b = torch.randn(2, n, generator=torch.Generator().manual_seed(seed))
    return torch.stack([a, a.square() / 2 - 1 + 0.3 * b], 1)


def banana_log_density(points: torch.Tensor) -> torch.Tensor:
    """The banana's exact log-density: x ~ N(0, 1), then y | x ~ N(x^2/2 - 1, 0.3^2)."""
    x, y = points.unbind(1)
    return Normal(0.0, 1.0).log_prob(x) + Normal(x.square() / 2 - 1, 0.3).log_prob(y)


@pytest.fixture(scope="module")
def fitted_to_banana() -> dict[str, Sampler]:
    """Every sampler of SAMPLERS as evaluate.py builds it, fitted to 3000 banana points."""
    return {name: make_sampler(name, 2, n_components=3, seed=0).fit(banana(3000, seed=0)) for name in SAMPLERS}


def correlated_gaussian(n: int, seed: int) -> torch.Tensor:
    """(n, 3) draws of N(CORRELATED_MEAN, CORRELATED_COV)."""
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return CORRELATED_MEAN + noise @ torch.linalg.cholesky(CORRELATED_COV).T


def test_the_gaussian_sampler_recovers_a_correlated_gaussian():
    draws = GaussianSampler(3).fit(correlated_gaussian(20000, seed=0)).draw(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), CORRELATED_MEAN, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.T.cov(), CORRELATED_COV, atol=0.08, rtol=0)


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


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_fitted_sampler_round_trips_through_its_cache_and_a_generator_fixes_its_draws(name, fitted_to_banana):
    """As evaluate.py caches it: torch.save of state_dict(), read back with weights_only=True into a new sampler."""
    fitted = fitted_to_banana[name]
    cache = io.BytesIO()
    torch.save(fitted.state_dict(), cache)
    cache.seek(0)
    restored = make_sampler(name, 2, n_components=3).load_state_dict(torch.load(cache, weights_only=True))
    first = fitted.draw(7, torch.Generator().manual_seed(5))
    assert first.shape == (7, 2) and first.dtype == torch.float32 and first.device.type == "cpu"
    torch.testing.assert_close(restored.draw(7, torch.Generator().manual_seed(5)), first, rtol=0, atol=0)
    assert not torch.equal(fitted.draw(7, torch.Generator().manual_seed(6)), first)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_has_its_fid_and_kid_metrics(name):
    """evaluate.py writes fid_<name>, kid_<name> and kid_<name>_std for each sampler, and report.py looks each up."""
    for metric in (f"fid_{name}", f"kid_{name}", f"kid_{name}_std"):
        assert metric_key(f"val/{metric}") == metric.replace(name, "{sampler}")


@pytest.mark.parametrize("cls", [AE, VAE])
def test_any_autoencoder_decodes_a_samplers_draws(cls):
    model = cls((1, 12, 12), latent_dim=3)
    codes = torch.randn(200, 3)
    fitted = [
        GaussianSampler(3),
        GMMSampler(3, n_components=2),
        MAFSampler(3, max_steps=10),
        TwoStageSampler(3, max_steps=10),
    ]
    for sampler in (None, Sampler(3), *(sampler.fit(codes) for sampler in fitted)):
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
    for sampler in (
        GaussianSampler(4),
        GMMSampler(4, n_components=2),
        CodePrior(torch.randn(3, 2), 2, epochs=1),
        MAFSampler(4, max_steps=5),
        TwoStageSampler(4, max_steps=5),
    ):
        assert sampler.fit(codes).draw(3).shape == (3, 4)


def test_more_mixture_components_than_codes_is_a_clear_error():
    with pytest.raises(UserError, match=r"gmm_components=100000 .* 50 training codes(.|\n)*gmm_components<=50"):
        GMMSampler(2, n_components=100000).fit(torch.randn(50, 2))


def test_the_maf_density_integrates_to_one_and_is_the_change_of_variables_of_its_jacobian(fitted_to_banana):
    maf = fitted_to_banana["maf"]
    x, y = torch.linspace(-6, 6, 121), torch.linspace(-4, 16, 201)  # the banana and far beyond
    grid = torch.cartesian_prod(x, y)
    with torch.no_grad():
        mass = maf.log_prob(grid).exp().sum() * (x[1] - x[0]) * (y[1] - y[0])
    assert mass.item() == pytest.approx(1.0, abs=0.01)

    def to_base(code: torch.Tensor) -> torch.Tensor:
        return maf.to_base(code[None])[0][0]

    for code in banana(5, seed=1):
        log_det = torch.linalg.slogdet(jacobian(to_base, code)).logabsdet
        expected = Normal(0.0, 1.0).log_prob(to_base(code)).sum() + log_det
        assert maf.log_prob(code[None]).item() == pytest.approx(expected.item(), abs=1e-4)


def test_each_maf_layer_is_autoregressive_in_its_order_and_the_next_layer_reverses_it():
    layers = MAFSampler(4, n_layers=3).net.layers
    x = torch.randn(4)
    for k, layer in enumerate(layers):
        assert layer.order.tolist() == ([3, 2, 1, 0] if k % 2 else [0, 1, 2, 3])
        in_order = jacobian(lambda v, layer=layer: layer(v[None])[0][0], x)[layer.order][:, layer.order]
        assert (in_order.triu(1) == 0).all()  # u_i depends on no x_j after x_i in the layer's order
        below = torch.tril_indices(4, 4, -1)
        assert (in_order[below[0], below[1]] != 0).all() and (in_order.diagonal() != 0).all()  # and on all before
    full = jacobian(lambda v: layers[1](layers[0](v[None])[0])[0][0], x)
    assert (full != 0).all()  # reversed orders: every output of two layers depends on every input


def test_maf_draws_are_the_inverse_of_its_forward_map(fitted_to_banana):
    maf = fitted_to_banana["maf"]
    draws = maf.draw(500, torch.Generator().manual_seed(3))
    base = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(maf.to_base(draws)[0], base, atol=1e-4, rtol=0)
    codes = banana(500, seed=2)
    torch.testing.assert_close(maf.from_base(maf.to_base(codes)[0]), codes, atol=1e-4, rtol=0)


def test_maf_fits_a_banana_near_its_true_density_and_far_better_than_a_gaussian(fitted_to_banana):
    held_out = banana(3000, seed=1)
    gaussian = fitted_to_banana["gaussian"]
    gaussian_log_likelihood = MultivariateNormal(gaussian.mean, scale_tril=gaussian.scale_tril).log_prob(
        held_out.double()
    )
    with torch.no_grad():
        maf_log_likelihood = fitted_to_banana["maf"].log_prob(held_out).mean().item()
    true_log_likelihood = banana_log_density(held_out).mean().item()
    assert gaussian_log_likelihood.mean().item() < true_log_likelihood - 0.5  # the banana is far from Gaussian
    assert maf_log_likelihood == pytest.approx(true_log_likelihood, abs=0.1)
    x, y = fitted_to_banana["maf"].draw(5000, torch.Generator().manual_seed(0)).unbind(1)
    assert (y - x.square() / 2 + 1).std().item() == pytest.approx(0.3, abs=0.05)  # draws on the ridge, as wide


def test_the_two_stage_elbo_is_a_gaussian_likelihood_less_a_kl_in_code_space():
    codes = correlated_gaussian(300, seed=0)
    sampler = TwoStageSampler(3, max_steps=30).fit(codes)
    elbo = sampler.elbo(codes, torch.Generator().manual_seed(4))

    encoded_mean, encoded_log_var = sampler.net.encoder((codes - codes.mean(0)) / codes.std(0)).chunk(2, -1)
    posterior = Normal(encoded_mean, (encoded_log_var / 2).exp())
    u = encoded_mean + posterior.stddev * torch.randn(300, 3, generator=torch.Generator().manual_seed(4))
    gamma = sampler.net.log_gamma.exp()
    decoded = Normal(sampler.net.decoder(u) * codes.std(0) + codes.mean(0), gamma.sqrt() * codes.std(0))
    expected = decoded.log_prob(codes).sum(1) - kl_divergence(posterior, Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(elbo, expected, atol=1e-4, rtol=1e-5)


def test_the_two_stage_sampler_recovers_a_correlated_gaussian():
    codes = correlated_gaussian(4000, seed=0)
    two_stage = TwoStageSampler(3).fit(codes)
    held_out = correlated_gaussian(4000, seed=1)
    with torch.no_grad():
        elbo = two_stage.elbo(held_out, torch.Generator().manual_seed(0)).mean().item()
    true_log_likelihood = MultivariateNormal(CORRELATED_MEAN, CORRELATED_COV).log_prob(held_out).mean().item()
    assert true_log_likelihood - 0.2 < elbo < true_log_likelihood + 0.05  # a bound, and nearly tight
    draws = two_stage.draw(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), codes.mean(0), atol=0.08, rtol=0)
    torch.testing.assert_close(draws.T.cov(), codes.T.cov(), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("cls", [MAFSampler, TwoStageSampler])
def test_a_network_sampler_fit_is_seeded_leaves_the_global_random_state_alone_and_runs_under_no_grad(cls):
    codes = correlated_gaussian(100, seed=0)
    global_state = torch.get_rng_state()
    fitted = cls(3, max_steps=20, seed=0).fit(codes)
    with torch.no_grad():  # as evaluate.py fits samplers
        again = cls(3, max_steps=20, seed=0).fit(codes)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.testing.assert_close(again.state_dict(), fitted.state_dict(), rtol=0, atol=0)
    draws = fitted.draw(5, torch.Generator().manual_seed(0))
    for other in (cls(3, max_steps=20, seed=0), cls(3, max_steps=20, seed=1).fit(codes)):  # unfitted, another seed
        assert not torch.equal(other.draw(5, torch.Generator().manual_seed(0)), draws)
    refitted = fitted.fit(codes).state_dict()
    torch.testing.assert_close(refitted, again.state_dict(), rtol=0, atol=0)  # a second fit starts afresh


def test_too_few_codes_and_an_unknown_sampler_are_clear_errors():
    with pytest.raises(UserError, match=r"1 training code\(s\) .* MAFSampler(.|\n)*at least 2 codes"):
        MAFSampler(2).fit(torch.randn(1, 2))
    with pytest.raises(UserError, match=r"flow is no sampler. Use any of prior, gaussian, gmm, maf, two_stage"):
        make_sampler("flow", 2)
