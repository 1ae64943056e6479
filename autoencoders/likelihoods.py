"""Decoder likelihoods p(x|z) for images in [0, 1]: normalised, in nats per image.

The decoder outputs `params` of shape (B, m*C, H, W) for x of shape (B, C, H, W), m = `param_multiplier`.
"""

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal

from autoencoders.errors import UserError


class Likelihood(ABC):
    """Computes in float32 whatever dtype comes in: under bf16 or fp16 autocast the decoder's outputs are half
    precision (a sigmoid is not on autocast's fp32 list), which would move a logistic's centre by up to half a pixel."""

    name: str
    param_multiplier: int  # decoder output channels per image channel
    discrete: bool  # True: a probability mass over pixel values; False: a density on [0, 1] or R

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """-log p(x | params) summed over pixels and channels, shape (B,), nats per image."""
        expected = (x.shape[0], self.param_multiplier * x.shape[1], *x.shape[2:])
        if params.shape != expected:
            raise ValueError(f"{self.name} needs params of shape {expected} for x of shape {tuple(x.shape)}")
        return -self._log_prob(_at_least_fp32(params), _at_least_fp32(x)).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        """E[x | params], the shape of x, in [0, 1]."""
        return self._mean(_at_least_fp32(params))

    @abstractmethod
    def _mean(self, params: Tensor) -> Tensor:
        """E[x | params] of float32 (or float64) params."""

    @abstractmethod
    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """Per-pixel log p(x | params), the shape of x."""


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Bernoulli(Likelihood):
    name = "bernoulli"
    param_multiplier = 1
    discrete = True

    def _mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none")


# Near logit 0 the closed forms cancel catastrophically, so inside these windows their series take over (to ~1e-9).
# The mean's closed form, 1/(1-e^-eta) - 1/eta, loses ~1e-7/|eta| absolutely in float32, hence its wider window.
_LOG_NORM_SERIES_BELOW = 0.1
_MEAN_SERIES_BELOW = 1.0


class ContinuousBernoulli(Likelihood):
    """Loaiza-Ganem & Cunningham (2019), written in the logit eta: C(lambda) = eta / tanh(eta / 2).

    Not torch.distributions.ContinuousBernoulli: it clamps lambda to [eps, 1 - eps] in its normaliser but not in its
    Bernoulli term, so in float32 its density integrates to 0.80 at logit 20 and 0.53 at logit 30.
    """

    name = "continuous_bernoulli"
    param_multiplier = 1
    discrete = False

    def _mean(self, params: Tensor) -> Tensor:
        """1/(1 - e^-eta) - 1/eta, in terms of |eta| so that nothing overflows (nor its gradient) for large |eta|."""
        small = params.abs() < _MEAN_SERIES_BELOW
        a = torch.where(small, torch.ones_like(params), params.abs())  # keeps the unused branch (and its grad) finite
        tail = torch.exp(-a) / -torch.expm1(-a)  # 1/(e^a - 1)
        closed = torch.where(params > 0, 1 + tail - 1 / a, 1 / a - tail)
        e2 = params.square()
        series = 0.5 + params * (1 / 12 + e2 * (-1 / 720 + e2 * (1 / 30240 + e2 * (-1 / 1209600 + e2 / 47900160))))
        return torch.where(small, series, closed)

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none") + _log_norm(params)


def _log_norm(eta: Tensor) -> Tensor:
    """log C(lambda) = log(eta / tanh(eta / 2)), even in eta, log 2 at eta = 0, ~log|eta| for large |eta|."""
    small = eta.abs() < _LOG_NORM_SERIES_BELOW
    a = torch.where(small, torch.ones_like(eta), eta.abs())
    e2 = eta.square()
    series = math.log(2) + e2 * (1 / 12 + e2 * (-7 / 1440 + e2 * 31 / 90720))
    return torch.where(small, series, torch.log(a / torch.tanh(a / 2)))


# Gaussian: a density on 8-bit data gains without bound by collapsing onto exact pixel values; a scale floor of 1e-3
# (a quarter of the 1/255 pixel step) caps that at ~6 nats per pixel. Logistic: PixelCNN++'s floor, a quarter of a
# bin already, where smaller scales would only sharpen the gradients.
_GAUSSIAN_MIN_LOG_SCALE = math.log(1e-3)
_LOGISTIC_MIN_LOG_SCALE = -7.0


class Gaussian(Likelihood):
    name = "gaussian"
    param_multiplier = 2
    discrete = False

    def _location(self, loc: Tensor) -> Tensor:
        """The mean from the decoder's output: in (0, 1), where intensities lie."""
        return torch.sigmoid(loc)

    def _mean(self, params: Tensor) -> Tensor:
        return self._location(params.chunk(2, dim=1)[0])

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_scale = params.chunk(2, dim=1)
        scale = log_scale.clamp(min=_GAUSSIAN_MIN_LOG_SCALE).exp()
        return Normal(self._location(loc), scale, validate_args=False).log_prob(x)  # no check: no GPU sync per step


class DiscretisedLogistic(Likelihood):
    """PixelCNN++'s discretised logistic (Salimans et al. 2017) over the values k/255, bins 1/255 wide.

    The bin mass is computed exactly in log space, sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b-a)),
    so it needs no fallback to density times bin width (which leaves up to ~1e-5 of the mass out at small scales).
    Bin edges come from the pixel index k = round(255 x), so that neighbouring bins share them exactly.
    """

    name = "logistic"
    param_multiplier = 2
    discrete = True

    def _mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.chunk(2, dim=1)[0])  # the location: the mean, up to the mass piled on edge bins

    def _log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_scale = params.chunk(2, dim=1)
        log_scale = log_scale.clamp(min=_LOGISTIC_MIN_LOG_SCALE)
        k = torch.round(x * 255)
        centre = 255 * torch.sigmoid(loc)
        inv_width = torch.exp(-log_scale - math.log(255))  # bin width over scale
        upper, lower = (k + 0.5 - centre) * inv_width, (k - 0.5 - centre) * inv_width
        log_cdf_upper, log_sf_lower = F.logsigmoid(upper), F.logsigmoid(-lower)
        interior = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(-inv_width))
        return torch.where(k <= 0, log_cdf_upper, torch.where(k >= 255, log_sf_lower, interior))


LIKELIHOODS: dict[str, Likelihood] = {
    lik.name: lik for lik in (Bernoulli(), ContinuousBernoulli(), Gaussian(), DiscretisedLogistic())
}


def likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise UserError(f"model.likelihood={name!r} is unknown. Use one of: {', '.join(LIKELIHOODS)}.")
    return LIKELIHOODS[name]


def bits_per_dim(nll: Tensor, num_dims: int) -> Tensor:
    return nll / (num_dims * math.log(2))


def for_data(name: str | None, binarize: str | None) -> str:
    """The likelihood of a model trained or scored on data with this `binarize` setting: `name`, or for null the
    data's natural one (bernoulli on binarised data, the discretised logistic on 8-bit intensities). A Bernoulli on
    intensities in [0, 1] is no normalised likelihood, and a density on binary pixels has no maximum (it collapses onto
    0 and 1 at its scale floor), so both are refused."""
    binary = binarize is not None
    if name is None:
        return "bernoulli" if binary else "logistic"
    likelihood(name)
    if name == "bernoulli" and not binary:
        raise UserError(
            "model.likelihood=bernoulli is a likelihood of binary images, but data.binarize=null gives intensities in "
            "[0, 1], on which its nats are no likelihood. Set data.binarize=dynamic (or static), or choose a "
            "likelihood of [0, 1] data: model.likelihood=continuous_bernoulli, logistic or gaussian."
        )
    if binary and name in ("gaussian", "continuous_bernoulli"):
        raise UserError(
            f"model.likelihood={name} is a density of intensities in [0, 1], but data.binarize={binarize} gives binary "
            "pixels, on which a density grows without bound as it collapses onto 0 and 1 (here: to its scale floor). "
            "Use model.likelihood=bernoulli (or null) on binarised data, or data.binarize=null to model intensities."
        )
    return name
