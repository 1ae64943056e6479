"""The hyperspherical VAE (Davidson et al., 2018): a von Mises-Fisher posterior on the unit sphere, a uniform prior."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.models.vae import VAE
from autoencoders.nets import build_nets
from autoencoders.samplers import Sampler

# log I_v(kappa): a power series where sqrt(v^2 + kappa^2) < SERIES_BELOW, Debye's uniform expansion elsewhere; within
# 1e-9 of log scipy.special.ive for v up to 300 and kappa from 1e-3 to 1e5, the hand-over included (tested).
SERIES_BELOW, SERIES_TERMS = 50.0, 200
# u_j(p) / p^j of Debye's expansion I_v(v z) ~ e^(v eta) / sqrt(2 pi v) / (1 + z^2)^(1/4) sum_j u_j(p) / v^j,
# p = 1 / sqrt(1 + z^2) (Abramowitz & Stegun 9.3.9-10): coefficients of p^0, p^2, p^4, ...
DEBYE_TERMS = (
    (1.0,),
    (3 / 24, -5 / 24),
    (81 / 1152, -462 / 1152, 385 / 1152),
    (30375 / 414720, -369603 / 414720, 765765 / 414720, -425425 / 414720),
    (4465125 / 39813120, -94121676 / 39813120, 349922430 / 39813120, -446185740 / 39813120, 185910725 / 39813120),
)


def log_ive(order: float, kappa: Tensor) -> Tensor:
    """log(I_v(kappa) e^-kappa), the exponentially scaled modified Bessel function of the first kind of order v >= 0
    (scipy's `ive`), differentiable in kappa > 0. torch.special has orders 0 and 1 only (i0e, i1e); a sphere in d
    dimensions needs v = d/2 - 1, so this is computed in float64 from the series sum_m (kappa/2)^(2m+v) / (m!
    Gamma(m+v+1)), all of its terms positive, for small v and kappa, and otherwise from Debye's expansion written in
    r = sqrt(v^2 + kappa^2), p = v / r, its terms O(r^-j) for any v (v = 0 included)."""
    k = kappa.double()
    small = k.square() + order**2 < SERIES_BELOW**2
    k_small = torch.where(small, k, 1.0)  # each branch sees only values it is accurate and finite for
    m = torch.arange(SERIES_TERMS, dtype=k.dtype, device=k.device)
    log_terms = (2 * m + order) * torch.log(k_small / 2).unsqueeze(-1) - torch.lgamma(m + 1)
    series = torch.logsumexp(log_terms - torch.lgamma(m + order + 1), -1) - k_small
    k_large = torch.where(small, SERIES_BELOW, k)
    r = torch.sqrt(k_large.square() + order**2)
    p2 = (order / r).square()
    expansion = sum(sum(c * p2**i for i, c in enumerate(u)) / r**j for j, u in enumerate(DEBYE_TERMS))
    debye = r - k_large + order * torch.log(k_large / (order + r)) - 0.5 * torch.log(2 * math.pi * r)
    return torch.where(small, series, debye + torch.log(expansion)).to(kappa.dtype)


def log_sphere_area(dim: int) -> float:
    """log of the surface area of the unit sphere S^(dim-1) in R^dim, 2 pi^(dim/2) / Gamma(dim/2)."""
    return math.log(2) + dim / 2 * math.log(math.pi) - math.lgamma(dim / 2)


def vmf_log_prob(z: Tensor, mu: Tensor, kappa: Tensor) -> Tensor:
    """log vMF(z; mu, kappa) w.r.t. the sphere's surface measure, of unit codes z (..., B, d), mean directions mu
    (B, d) and concentrations kappa (B, 1): log C_d(kappa) + kappa mu.z, C_d = kappa^v / ((2 pi)^(d/2) I_v(kappa)),
    v = d/2 - 1; kappa (mu.z - 1) and the scaled Bessel function keep the large terms from cancelling."""
    d = mu.shape[-1]
    log_norm = (d / 2 - 1) * torch.log(kappa) - d / 2 * math.log(2 * math.pi) - log_ive(d / 2 - 1, kappa)
    return (log_norm + kappa * ((z * mu).sum(-1, keepdim=True) - 1)).squeeze(-1)


def vmf_kl_to_uniform(kappa: Tensor, dim: int) -> Tensor:
    """KL(vMF(mu, kappa) || uniform on S^(dim-1)) per row of kappa (B, 1), nats: E[log q] + log area = log C_d(kappa)
    + kappa A_d(kappa) + log area, A_d = I_(d/2) / I_(d/2-1) the mean resultant length E[mu.z]; written as
    v log(kappa/2) - lgamma(v + 1) - log ive_v(kappa) - kappa (1 - A_d), which tends to 0 with kappa."""
    v, k = dim / 2 - 1, kappa.double()  # float64 throughout: 1 - A_d is a difference of two nearby logs
    log_ive_v = log_ive(v, k)
    one_minus_a = -torch.expm1(log_ive(v + 1, k) - log_ive_v)
    return (v * torch.log(k / 2) - math.lgamma(v + 1) - log_ive_v - k * one_minus_a).squeeze(-1).to(kappa.dtype)


def wood_w(kappa: Tensor, dim: int, n: int) -> Tensor:
    """n draws (n, B, 1) of w = mu.z for z ~ vMF(mu, kappa) on S^(dim-1), by Wood's (1994) rejection sampler: a
    proposal w = (1 - (1 + b) eps) / (1 - (1 - b) eps), eps ~ Beta((d-1)/2, (d-1)/2), accepted with probability
    exp(kappa w + (d - 1) log(1 - x0 w) - c), redrawn where rejected (in float64, without gradients). The accepted
    eps is then held fixed and w recomputed as a differentiable function of kappa: the paper's reparameterisation
    gradient g_rep. The correction g_cor (the draw's value times the kappa-score of the accepted eps's density) is
    dropped, as in the authors' PyTorch code: it spares a high-variance score-function term, at the cost of a bias in
    kappa's gradient where kappa is small: E[dw/dkappa] is 0.55-0.8 of dA_d/dkappa at kappa 1 to 3 for d = 2 and 3,
    0.9-0.95 at kappa 10, about 0.98 at kappa 50 and 0.998 at kappa 500 (measured for d = 2 to 64; tested at kappa 3
    and from 1000 on). mu's gradient has no such term: the accepted eps's density does not depend on mu."""
    m1 = dim - 1
    with torch.no_grad():
        k = kappa.double().expand(n, *kappa.shape)
        root = torch.sqrt(4 * k.square() + m1**2)
        b = m1 / (2 * k + root)  # = (-2 kappa + root) / (d - 1), without the cancellation at large kappa
        x0 = (1 - b) / (1 + b)
        c = k * x0 + m1 * torch.log1p(-x0.square())
        half = torch.tensor(m1 / 2, dtype=k.dtype, device=k.device)
        proposal = torch.distributions.Beta(half, half)
        eps, pending = torch.zeros_like(k), torch.isfinite(k)  # a nan kappa gives nan draws, not an endless loop
        while pending.any():
            e = proposal.sample(k.shape)
            w = (1 - (1 + b) * e) / (1 - (1 - b) * e)
            accept = pending & (k * w + m1 * torch.log1p(-x0 * w) - c >= torch.log(torch.rand_like(k)))
            eps, pending = torch.where(accept, e, eps), pending & ~accept
    eps = eps.to(kappa.dtype)
    b = m1 / (2 * kappa + torch.sqrt(4 * kappa.square() + m1**2))
    return 1 - 2 * b * eps / (1 - (1 - b) * eps)  # 1 - w written without cancelling near w = 1


def vmf_rsample(mu: Tensor, kappa: Tensor, n: int) -> Tensor:
    """n reparameterised draws (n, B, d) from vMF(mu, kappa), mu (B, d) unit, kappa (B, 1): z' = (w, sqrt(1 - w^2) v)
    with w from `wood_w` and v uniform on S^(d-2), then a Householder reflection taking e1 to mu (to -mu, then
    negated, where mu_1 > 0: the reflection's vector e1 -/+ mu then never nearly vanishes)."""
    w = wood_w(kappa, mu.shape[-1], n)
    v = F.normalize(torch.randn(n, *mu.shape[:-1], mu.shape[-1] - 1, dtype=mu.dtype, device=mu.device), dim=-1)
    tangential = torch.sqrt((1 - w.square()).clamp_min(torch.finfo(w.dtype).tiny))
    z = torch.cat([w, tangential * v], -1)
    sign = torch.where(mu[..., :1] > 0, 1.0, -1.0)
    u = torch.cat([1 + sign * mu[..., :1], sign * mu[..., 1:]], -1)  # e1 + mu where mu_1 > 0, else e1 - mu
    reflected = z - 2 * (z * u).sum(-1, keepdim=True) / u.square().sum(-1, keepdim=True) * u
    return -sign * reflected


class UniformSphere(Sampler):
    """The uniform distribution on the unit sphere S^(dim-1): N(0, I) draws over their norms."""

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return F.normalize(super().draw(n, generator), dim=-1)


class HypersphericalVAE(VAE):
    """S-VAE (Davidson et al., 2018, "Hyperspherical variational auto-encoders"): codes on the unit sphere S^(d-1),
    d = `latent_dim` (2 or more), with q(z|x) = vMF(mu(x), kappa(x)) and a uniform prior p(z) = 1 / area(S^(d-1)).
    The encoder outputs d + 1 numbers, as the authors' network does: `loc`, whose direction is mu, and kappa =
    softplus(.) + 1. z is drawn by Wood's rejection sampler and a Householder reflection (`vmf_rsample`; its gradient
    is the paper's g_rep, without g_cor), the KL is in closed form (`vmf_kl_to_uniform`), and `test/nll` weights its
    draws by the vMF's log-density. The code (`encode`) is mu; a classifier built from this encoder reads `loc`.
    `code_multiplier` stays a VAE's 2 as the classifier's sign that the net's first `latent_dim` outputs are the
    code; the net has `latent_dim` + 1 (`build_nets`)."""

    def build_nets(self, widths: Sequence[int] | None, decoder_shape: Sequence[int]) -> tuple[nn.Module, nn.Module]:
        arch, shape = self.hparams.arch, self.image_shape
        return build_nets(arch, shape, self.latent_dim + 1, self.latent_dim, widths, decoder_shape)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, kappa), (B, d) and (B, 1): the encoder's outputs, the mean direction mu = loc / |loc|."""
        loc, kappa = self.encoder(x).split([self.latent_dim, 1], dim=1)
        return loc, F.softplus(kappa) + 1

    def vmf(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x)'s mean direction mu (B, d) and concentration kappa (B, 1)."""
        loc, kappa = self.posterior(x)
        return F.normalize(loc, dim=-1), kappa

    def encode(self, x: Tensor) -> Tensor:
        return self.vmf(x)[0]

    def kl_per_dim(self, x: Tensor) -> None:
        """None: a vMF's KL does not split into one term per dimension."""
        return None

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z) of codes (..., D) on the sphere: the uniform density, -log area(S^(D-1))."""
        return torch.full(z.shape[:-1], -log_sphere_area(z.shape[-1]), dtype=z.dtype, device=z.device)

    def prior_sampler(self) -> UniformSphere:
        return UniformSphere(self.latent_dim)

    def latent_draws(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        mu, kappa = self.vmf(x)
        z = vmf_rsample(mu, kappa, n)
        return z, vmf_log_prob(z, mu, kappa) - self.prior_log_prob(z)

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One-sample reconstruction NLL and the analytic KL(q(z|x) || uniform) per image (nats)."""
        mu, kappa = self.vmf(x)
        z = vmf_rsample(mu, kappa, 1)[0]
        return self.likelihood.nll(self.decoder(z), x), vmf_kl_to_uniform(kappa, self.latent_dim)
