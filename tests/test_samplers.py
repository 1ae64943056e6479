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
    CODE_SAMPLERS,
    SAMPLERS,
    CodePrior,
    GaussianSampler,
    GMMSampler,
    IAFSampler,
    MAFSampler,
    PixelCNNPrior,
    Sampler,
    TwoStageSampler,
    make_sampler,
    token_grid,
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
    """Every code sampler as evaluate.py builds it, fitted to 3000 banana points."""
    return {name: make_sampler(name, 2, n_components=3, seed=0).fit(banana(3000, seed=0)) for name in CODE_SAMPLERS}


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


@pytest.mark.parametrize("name", CODE_SAMPLERS)
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
        IAFSampler(3, max_steps=10),
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
        IAFSampler(4, max_steps=5),
        TwoStageSampler(4, max_steps=5),
    ):
        assert sampler.fit(codes).draw(3).shape == (3, 4)


def test_more_mixture_components_than_codes_is_a_clear_error():
    with pytest.raises(UserError, match=r"gmm_components=100000 .* 50 training codes(.|\n)*gmm_components<=50"):
        GMMSampler(2, n_components=100000).fit(torch.randn(50, 2))


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_each_flows_density_integrates_to_one_and_is_the_change_of_variables_of_its_jacobian(name, fitted_to_banana):
    flow = fitted_to_banana[name]
    x, y = torch.linspace(-6, 6, 121), torch.linspace(-4, 16, 201)  # the banana and far beyond
    grid = torch.cartesian_prod(x, y)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (x[1] - x[0]) * (y[1] - y[0])
    assert mass.item() == pytest.approx(1.0, abs=0.01)

    def to_base(code: torch.Tensor) -> torch.Tensor:
        return flow.to_base(code[None])[0][0]

    for code in banana(5, seed=1):
        log_det = torch.linalg.slogdet(jacobian(to_base, code)).logabsdet
        expected = Normal(0.0, 1.0).log_prob(to_base(code)).sum() + log_det
        assert flow.log_prob(code[None]).item() == pytest.approx(expected.item(), abs=1e-4)


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


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_each_flows_draws_are_the_inverse_of_its_forward_map(name, fitted_to_banana):
    flow = fitted_to_banana[name]
    draws = flow.draw(500, torch.Generator().manual_seed(3))
    base = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(flow.to_base(draws)[0], base, atol=1e-4, rtol=0)
    codes = banana(500, seed=2)
    torch.testing.assert_close(flow.from_base(flow.to_base(codes)[0]), codes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_each_flow_fits_a_banana_near_its_true_density_and_far_better_than_a_gaussian(name, fitted_to_banana):
    held_out = banana(3000, seed=1)
    gaussian = fitted_to_banana["gaussian"]
    gaussian_log_likelihood = MultivariateNormal(gaussian.mean, scale_tril=gaussian.scale_tril).log_prob(
        held_out.double()
    )
    with torch.no_grad():
        flow_log_likelihood = fitted_to_banana[name].log_prob(held_out).mean().item()
    true_log_likelihood = banana_log_density(held_out).mean().item()
    assert gaussian_log_likelihood.mean().item() < true_log_likelihood - 0.5  # the banana is far from Gaussian
    assert flow_log_likelihood == pytest.approx(true_log_likelihood, abs=0.1)
    x, y = fitted_to_banana[name].draw(5000, torch.Generator().manual_seed(0)).unbind(1)
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


@pytest.mark.parametrize("cls", [MAFSampler, IAFSampler, TwoStageSampler])
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
    with pytest.raises(UserError, match=r"flow is no sampler. Use any of prior, gaussian, gmm, maf, iaf, two_stage"):
        make_sampler("flow", 2)


# The PixelCNN prior over tokens ------------------------------------------------------------------------------------
def one_hot_codes(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Codes whose tokens (N, n) are `tokens`, for a codebook of `size` one-hot vectors: each token its vector."""
    return torch.nn.functional.one_hot(tokens, size).float().flatten(1)


def diagonal_tokens(n: int, grid: tuple[int, int], size: int, seed: int) -> torch.Tensor:
    """(n, rows x columns) tokens (a + row + column) mod size, a uniform: after the first, each token is fixed."""
    a = torch.randint(size, (n, 1, 1), generator=torch.Generator().manual_seed(seed))
    rows, columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return ((a + rows + columns) % size).flatten(1)


def test_the_pixelcnn_likelihood_is_the_sum_of_its_conditionals_each_blind_to_later_tokens():
    """On a 2 x 3 grid of 3-valued tokens: log p(tokens) equals the sum over positions of log p(token | earlier
    tokens), each read from a pass in which every later token is replaced at random; the 729 grids' probabilities sum
    to 1."""
    size, n_tokens = 3, 6
    prior = PixelCNNPrior(torch.eye(size), n_tokens, channels=8, layers=3, seed=1)
    assert prior.grid == (2, 3)
    every = torch.cartesian_prod(*[torch.arange(size)] * n_tokens)  # (729, 6)
    with torch.no_grad():
        log_p = prior.log_prob(one_hot_codes(every, size))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
        generator = torch.Generator().manual_seed(0)
        explicit = torch.zeros(len(every))
        for position in range(n_tokens):
            masked = every.clone()
            masked[:, position:] = torch.randint(size, masked[:, position:].shape, generator=generator)
            masked[:, position] = 0  # its own token hidden too: the logits there must not read it
            logits = prior.net(masked.view(-1, *prior.grid)).flatten(2)[:, :, position]
            explicit += logits.log_softmax(1).gather(1, every[:, position, None]).squeeze(1)
    torch.testing.assert_close(log_p, explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_tokens", [4, 16, 10, 64])  # grids 2 x 2, 4 x 4, 2 x 5, 8 x 8
def test_each_pixelcnn_token_sees_every_earlier_token_and_none_at_or_after_it(n_tokens):
    prior = PixelCNNPrior(torch.eye(3), n_tokens, channels=4)
    (rows, columns), net = prior.grid, prior.net
    embedded = net.embed(torch.randint(3, (1, rows, columns))).detach().requires_grad_()
    net.embed.register_forward_hook(lambda *_: embedded)  # the logits as a function of the tokens' embeddings
    logits = net(torch.zeros(1, rows, columns, dtype=torch.long))
    for position in range(n_tokens):
        (grad,) = torch.autograd.grad(logits.flatten(2)[0, :, position].sum(), embedded, retain_graph=True)
        seen = grad.abs().sum(-1).flatten() > 0
        assert seen.tolist() == [earlier < position for earlier in range(n_tokens)]


def test_the_pixelcnn_learns_what_an_independent_code_prior_cannot_and_draws_it():
    """Tokens (a + row + column) mod 5 on a 2 x 2 grid: each token alone is uniform, so per-position frequencies
    give held-out tokens 4 log 5 nats, while the truth is log 5 (the first token fixes the rest)."""
    size, grid = 5, (2, 2)
    train, held_out = (diagonal_tokens(2000, grid, size, seed) for seed in (0, 1))
    prior = PixelCNNPrior(torch.eye(size), 4, channels=16, layers=2, max_steps=400).fit(one_hot_codes(train, size))
    frequencies = torch.stack([torch.bincount(train[:, i], minlength=size) / len(train) for i in range(4)])
    independent = -frequencies.log().gather(1, held_out.T).sum(0).mean().item()
    with torch.no_grad():
        pixelcnn = -prior.log_prob(one_hot_codes(held_out, size)).mean().item()
    assert independent == pytest.approx(4 * math.log(size), abs=0.05)
    assert pixelcnn < math.log(size) + 0.1
    draws = prior.draw(200, torch.Generator().manual_seed(0)).view(200, 4, size).argmax(-1)
    on_the_diagonals = (draws == (draws[:, :1] + torch.tensor([0, 1, 1, 2])) % size).all(1)
    assert on_the_diagonals.float().mean() > 0.97 and len(draws[:, 0].unique()) == size


def test_the_pixelcnn_round_trips_through_its_cache_and_a_generator_fixes_its_draws():
    vectors = torch.randn(4, 2)
    codes = vectors[torch.randint(4, (300, 6), generator=torch.Generator().manual_seed(0))].flatten(1)
    fitted = PixelCNNPrior(vectors, 6, channels=8, layers=2, max_steps=20).fit(codes + 0.01)
    cache = io.BytesIO()
    torch.save(fitted.state_dict(), cache)
    cache.seek(0)
    restored = PixelCNNPrior(vectors, 6, channels=8, layers=2).load_state_dict(torch.load(cache, weights_only=True))
    first = fitted.draw(7, torch.Generator().manual_seed(5))
    assert first.shape == (7, 12) and set(map(tuple, first.view(-1, 2).tolist())) <= set(map(tuple, vectors.tolist()))
    torch.testing.assert_close(restored.draw(7, torch.Generator().manual_seed(5)), first, rtol=0, atol=0)
    torch.testing.assert_close(restored.log_prob(codes), fitted.log_prob(codes), rtol=0, atol=0)
    assert not torch.equal(fitted.draw(7, torch.Generator().manual_seed(6)), first)


@pytest.mark.parametrize(("n", "grid"), [(1, (1, 1)), (4, (2, 2)), (5, (1, 5)), (6, (2, 3)), (16, (4, 4))])
def test_tokens_fold_into_the_squarest_grid(n, grid):
    assert token_grid(n) == grid
