import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from autoencoders.errors import UserError
from autoencoders.likelihoods import LIKELIHOODS, _log_norm, bits_per_dim, likelihood

NODES, WEIGHTS = np.polynomial.legendre.leggauss(200)  # Gauss-Legendre on [-1, 1]: exact for e^(eta x) to 1e-12


def integrate_01(f) -> float:
    """Integral over [0, 1] of a vectorised f."""
    return float(0.5 * (WEIGHTS * f(0.5 * (NODES + 1))).sum())


def pixel_nll(name: str, x, loc: float, log_scale: float | None = None, dtype=torch.float64) -> np.ndarray:
    """The nll of one-pixel images, one per value of x, all with the same params (log_scale only when m = 2)."""
    x = torch.as_tensor(np.asarray(x), dtype=dtype).reshape(-1, 1, 1, 1)
    channels = [loc] if log_scale is None else [loc, log_scale]
    params = torch.tensor(channels, dtype=dtype).reshape(1, -1, 1, 1).expand(len(x), -1, 1, 1)
    return likelihood(name).nll(params, x).double().numpy()


def cb_density(logit: float, dtype=torch.float64):
    return lambda x: np.exp(-pixel_nll("continuous_bernoulli", x, logit, dtype=dtype))


def test_bernoulli_sums_to_one_over_all_binary_images():
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).reshape(16, 1, 2, 2)
    logits = (3 * torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))).expand(16, -1, -1, -1)
    assert torch.exp(-likelihood("bernoulli").nll(logits, images)).sum().item() == pytest.approx(1, abs=1e-5)


LOGISTIC_PARAMS = [  # (location logit, log-scale): mid, near 0 and 1 (edge bins), tiny (clamped), small, large
    (0.0, -7.0),
    (0.0, -3.0),
    (0.3, 0.0),
    (-8.0, -5.0),
    (8.0, -5.0),
    (-20.0, -20.0),
    (20.0, 2.0),
    (1.1, 8.0),
]


@pytest.mark.parametrize("loc,log_scale", LOGISTIC_PARAMS)
def test_logistic_sums_to_one_over_the_256_values(loc, log_scale):
    nll = pixel_nll("logistic", np.arange(256) / 255, loc, log_scale, torch.float32)
    assert np.exp(-nll).sum() == pytest.approx(1, abs=1e-6)


def test_logistic_sums_to_one_over_all_pairs_of_two_pixels():
    k0, k1 = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    x = (torch.stack([k0, k1], -1).reshape(-1, 1, 1, 2) / 255).float()
    params = torch.tensor([[0.2, -6.0], [-2.0, -1.0]]).reshape(1, 2, 1, 2).expand(len(x), -1, -1, -1)
    assert torch.exp(-likelihood("logistic").nll(params, x)).double().sum().item() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("loc,log_scale", LOGISTIC_PARAMS[1:5])
def test_logistic_bin_masses_match_scipy(loc, log_scale):
    mu, s = special.expit(loc), math.exp(log_scale)
    k = np.arange(256)
    lower, upper = (k - 0.5) / 255, (k + 0.5) / 255
    cdf = stats.logistic(mu, s).cdf
    sf = stats.logistic(mu, s).sf
    # each bin from the side of the mean where both tail masses are small, to keep scipy's difference accurate
    expected = np.where(lower > mu, sf(lower) - sf(upper), cdf(upper) - cdf(lower))
    expected[0], expected[-1] = cdf(0.5 / 255), sf(254.5 / 255)
    np.testing.assert_allclose(-pixel_nll("logistic", k / 255, loc, log_scale), np.log(expected), rtol=1e-9)
    got32 = -pixel_nll("logistic", k / 255, loc, log_scale, torch.float32)
    np.testing.assert_allclose(got32, np.log(expected), rtol=1e-5, atol=1e-5)


CB_LOGITS = [0.0, 1e-4, -1e-4, 0.0999, -0.1001, 0.15, 0.5, 0.999, -1.001, 1.2, 3.0, 10.0, -10.0, 30.0, -30.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit", CB_LOGITS)
def test_continuous_bernoulli_integrates_to_one(logit, dtype):
    assert integrate_01(cb_density(logit, dtype)) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit", CB_LOGITS)
def test_continuous_bernoulli_mean_is_the_integral_of_x_p(logit, dtype):
    expected = integrate_01(lambda x: x * cb_density(logit)(x))
    mean = likelihood("continuous_bernoulli").mean(torch.tensor([[[[logit]]]], dtype=dtype))
    assert mean.item() == pytest.approx(expected, abs=1e-9 if dtype == torch.float64 else 3e-7)


def test_continuous_bernoulli_log_norm_matches_closed_form_away_from_one_half():
    # up to |logit| 15: beyond, 1 - 2 lambda is within 1e-6 of -1 or 1 and the float64 closed form loses digits
    logits = np.array([-15.0, -10.0, -3.0, -1.0, -0.3, -0.1001, 0.1001, 0.2, 1.0, 4.0, 12.0, 15.0])
    lam = special.expit(logits)
    closed = np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    np.testing.assert_allclose(_log_norm(torch.tensor(logits)).numpy(), closed, rtol=1e-9)
    np.testing.assert_allclose(_log_norm(torch.tensor(logits, dtype=torch.float32)).numpy(), closed, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuous_bernoulli_log_norm_is_log_abs_logit_for_large_logits(dtype):
    logits = torch.tensor([-1e4, -50.0, -25.0, 25.0, 30.0, 1e4], dtype=dtype)  # C = |eta| (1 + 2e^-|eta| + ...)
    np.testing.assert_allclose(_log_norm(logits).numpy(), np.log(np.abs(logits.double().numpy())), rtol=1e-7)


def test_continuous_bernoulli_log_norm_is_log_2_at_one_half_in_float32():
    eta = torch.tensor([0.0, 1e-6, -1e-6, 0.0999, -0.1001], requires_grad=True)
    log_c = _log_norm(eta)
    log_c.sum().backward()
    assert torch.isfinite(log_c).all() and torch.isfinite(eta.grad).all()
    assert log_c[:3].detach().numpy() == pytest.approx(math.log(2), abs=1e-7)
    # either side of the series window: log C = log 2 + eta^2 / 12 + O(eta^4)
    near = math.log(2) + np.array([0.0999, 0.1001]) ** 2 / 12
    assert log_c[3:].detach().numpy() == pytest.approx(near, abs=1e-5)


def test_continuous_bernoulli_log_prob_matches_its_definition():
    gen = torch.Generator().manual_seed(1)
    logits = 5 * torch.randn(50, 1, 1, 1, generator=gen, dtype=torch.float64)
    x = torch.rand(50, 1, 1, 1, generator=gen, dtype=torch.float64)
    eta, xs = logits.flatten().numpy(), x.flatten().double().numpy()
    lam = special.expit(eta)
    expected = xs * special.log_expit(eta) + (1 - xs) * special.log_expit(-eta)
    expected += np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    got = -likelihood("continuous_bernoulli").nll(logits, x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["continuous_bernoulli", "logistic", "gaussian"])
def test_extreme_params_give_finite_nll_and_gradients(name):
    """Every location logit along the width against every log-scale (up to 30) along the height, in float32."""
    lik = likelihood(name)
    values = torch.tensor([-100.0, -30.0, -20.0, 0.0, 20.0, 30.0, 100.0])
    loc, log_scale = values.reshape(1, 1, 1, 7).expand(1, 1, 7, 7), values.clamp(max=30).reshape(1, 1, 7, 1)
    params = loc if lik.param_multiplier == 1 else torch.cat([loc, log_scale.expand(1, 1, 7, 7)], 1)
    params = params.clone().requires_grad_()
    x = torch.tensor([0.0, 1 / 255, 0.5, 1.0, 1.0, 0.0, 0.2]).reshape(1, 1, 1, 7).expand(1, 1, 7, 7)
    nll = lik.nll(params, x)
    (nll.sum() + lik.mean(params).sum()).backward()
    assert torch.isfinite(nll).all() and torch.isfinite(params.grad).all()


@pytest.mark.parametrize("loc,log_scale", [(0.0, math.log(0.05)), (1.5, 0.0), (-2.0, math.log(3.0)), (0.0, -20.0)])
def test_gaussian_integrates_to_one_over_the_reals(loc, log_scale):
    mu, s = special.expit(loc), max(math.exp(log_scale), 1e-3)
    grid = np.linspace(mu - 15 * s, mu + 15 * s, 20001)
    density = np.exp(-pixel_nll("gaussian", grid, loc, log_scale))
    assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-6)


def test_gaussian_log_density_matches_scipy():
    gen = torch.Generator().manual_seed(2)
    params, x = torch.randn(4, 6, 2, 2, generator=gen), torch.rand(4, 3, 2, 2, generator=gen)
    params[0, 3:] = -20.0  # below the floor: the scale is 1e-3
    loc, log_scale = params[:, :3].numpy(), params[:, 3:].numpy()
    scale = np.exp(np.maximum(log_scale, math.log(1e-3)))
    expected = -stats.norm.logpdf(x.numpy(), special.expit(loc), scale).reshape(4, -1).sum(1)
    np.testing.assert_allclose(likelihood("gaussian").nll(params, x).numpy(), expected, rtol=1e-5, atol=1e-4)
    mean = likelihood("gaussian").mean(params)
    np.testing.assert_allclose(mean.numpy(), special.expit(loc), rtol=1e-6)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_shapes(name):
    lik = likelihood(name)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 2, 4, 5), generator=gen) / 255
    if name == "bernoulli":
        x = x.round()
    params = 5 * torch.randn(3, lik.param_multiplier * 2, 4, 5, generator=gen)
    assert lik.nll(params, x).shape == (3,)
    mean = lik.mean(params)
    assert mean.shape == x.shape and ((mean >= 0) & (mean <= 1)).all()
    with pytest.raises(ValueError, match="shape"):
        lik.nll(params[:, :1], x)


def test_bits_per_dim():
    dims = 3 * 32 * 32
    assert bits_per_dim(torch.tensor([dims * math.log(256)], dtype=torch.float64), dims).item() == 8.0
    # the same through a likelihood: a logistic so wide that its interior bins are all but uniform
    interior = torch.arange(1, 255).reshape(1, 1, 1, -1) / 255
    params = torch.tensor([0.0, 60.0]).reshape(1, 2, 1, 1).expand(1, 2, 1, 254)
    nll = likelihood("logistic").nll(params, interior)
    assert bits_per_dim(nll, 254).item() == pytest.approx(60 / math.log(2) + math.log2(4 * 255), rel=1e-5)


def test_registry_names_and_unknown_name():
    assert {name: lik.name for name, lik in LIKELIHOODS.items()} == {name: name for name in LIKELIHOODS}
    assert {name: (lik.param_multiplier, lik.discrete) for name, lik in LIKELIHOODS.items()} == {
        "bernoulli": (1, True),
        "continuous_bernoulli": (1, False),
        "gaussian": (2, False),
        "logistic": (2, True),
    }
    with pytest.raises(UserError) as err:
        likelihood("nope")
    assert str(err.value) == (
        "model.likelihood='nope' is unknown. Use one of: bernoulli, continuous_bernoulli, gaussian, logistic."
    )


def test_logistic_reads_x_as_the_nearest_pixel_value():
    k = torch.arange(256).reshape(1, 1, 1, 256)
    params = torch.tensor([0.3, -4.0]).reshape(1, 2, 1, 1).expand(1, 2, 1, 256)
    lik = likelihood("logistic")
    assert torch.equal(lik.nll(params, k / 255 + 0.4 / 255), lik.nll(params, k / 255))
