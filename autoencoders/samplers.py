"""Distributions over an autoencoder's codes to sample new images from: decode z drawn from one of them.

`prior` is N(0, I), a VAE's prior (and for a plain AE the lecture's "random embedding"). `gaussian` (a full-covariance
Gaussian), `gmm` (a Gaussian mixture), `maf` and `iaf` (masked and inverse autoregressive flows) and `two_stage` (a
second VAE over the codes, Dai & Wipf 2019) are fitted to the codes of the training images, ex-post density estimation
as in Ghosh et al. (2020): they give any autoencoder a distribution that its decoder has seen codes from. `pixelcnn`
fits a gated PixelCNN to a quantised model's tokens (models/vq.py). A fitted sampler is a few tensors (`state_dict`),
so evaluate.py caches it per checkpoint.
"""

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from autoencoders.errors import UserError
from autoencoders.nets import MADE, GatedPixelCNN

CODE_SAMPLERS = ("prior", "gaussian", "gmm", "maf", "iaf", "two_stage")  # any autoencoder's: make_sampler
SAMPLERS = (*CODE_SAMPLERS, "pixelcnn")  # and a quantised model's token prior: models/vq.py
CACHE_VERSION = 3  # bump when a sampler's fit or state changes, so evaluate.py refits instead of reusing stale caches


class Sampler:
    """z ~ N(0, I) in `dim` dimensions; subclasses (`needs_fit`) fit their distribution to codes first."""

    needs_fit = False

    def __init__(self, dim: int):
        self.dim = dim

    def fit(self, codes: Tensor) -> "Sampler":
        return self

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, dim) codes, on the generator's device (the CPU without one)."""
        return torch.randn(n, self.dim, generator=generator, device=generator.device if generator else None)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> "Sampler":
        return self


class GaussianSampler(Sampler):
    """A Gaussian with the codes' mean and full covariance (plus 1e-6 on the diagonal, so it is never singular)."""

    needs_fit = True

    def fit(self, codes: Tensor) -> "GaussianSampler":
        codes = codes.detach().double().cpu()
        jitter = 1e-6 * torch.eye(codes.shape[1], dtype=codes.dtype)
        return self.load_state_dict(
            {"mean": codes.mean(0), "scale_tril": torch.linalg.cholesky(codes.T.cov() + jitter)}
        )

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + eps @ self.scale_tril.T).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "scale_tril": self.scale_tril}

    def load_state_dict(self, state: dict[str, Tensor]) -> "GaussianSampler":
        self.mean, self.scale_tril = state["mean"], state["scale_tril"]
        return self


class GMMSampler(Sampler):
    """A mixture of `n_components` full-covariance Gaussians, fitted by EM (scikit-learn's GaussianMixture, seeded);
    drawn with torch, so a torch generator fixes the draws."""

    needs_fit = True

    def __init__(self, dim: int, n_components: int = 10, seed: int = 0):
        super().__init__(dim)
        self.n_components, self.seed = n_components, seed

    def fit(self, codes: Tensor) -> "GMMSampler":
        from sklearn.mixture import GaussianMixture  # scikit-learn loads only when a mixture is fitted

        if self.n_components > len(codes):
            raise UserError(
                f"gmm_components={self.n_components} is more mixture components than the {len(codes)} training codes "
                f"to fit them to. Use gmm_components<={len(codes)} (the default is 10)."
            )
        gmm = GaussianMixture(self.n_components, covariance_type="full", random_state=self.seed, reg_covar=1e-6)
        gmm.fit(codes.detach().double().cpu().numpy())
        state = {"weights": gmm.weights_, "means": gmm.means_, "scale_tril": torch.linalg.cholesky(
            torch.from_numpy(gmm.covariances_))}  # fmt: skip
        return self.load_state_dict({k: torch.as_tensor(v, dtype=torch.float64) for k, v in state.items()})

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return (self.means[component] + (self.scale_tril[component] @ eps).squeeze(-1)).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}

    def load_state_dict(self, state: dict[str, Tensor]) -> "GMMSampler":
        self.weights, self.means, self.scale_tril = state["weights"], state["means"], state["scale_tril"]
        return self


class NetSampler(Sampler):
    """A small network (`net`) fitted to the standardised codes (each dimension shifted and scaled to mean 0 and std
    1; the mean and std are part of the state; `prepare` may map codes to something else) by minimising its `loss`
    with Adam on batches of 256. A held-out tenth
    of the codes is scored every 100 steps; fitting stops after 5 scores without a new best, or at `max_steps`, and
    keeps the weights best on the held-out codes. The initial weights, the split, the batch order and any noise of the
    loss are seeded by `seed`, leaving the caller's random state as it was, so a fit depends on the codes alone."""

    needs_fit = True
    batch_size, lr, check_every, patience = 256, 3e-3, 100, 5

    def __init__(self, dim: int, net: Callable[[], nn.Module], max_steps: int, seed: int):
        super().__init__(dim)
        self.new_net, self.max_steps, self.seed = net, max_steps, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = net()  # the weights that `fit` starts from, for `load_state_dict` to replace without a fit
        self.mean, self.std = torch.zeros(dim), torch.ones(dim)

    def loss(self, z: Tensor) -> Tensor:
        """The loss of each standardised code, (B,)."""
        raise NotImplementedError

    def standardise(self, codes: Tensor) -> Tensor:
        return (codes - self.mean) / self.std

    def fit(self, codes: Tensor) -> "NetSampler":
        if len(codes) < 2:
            raise UserError(
                f"{len(codes)} training code(s) are too few to fit a {type(self).__name__} to: it standardises the "
                "codes and holds some out to stop fitting. Fit it to at least 2 codes (a training split of images)."
            )
        z = self.prepare(codes.detach().float().cpu())
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), _one_thread():
            torch.manual_seed(self.seed)
            self.net = self.new_net()  # a fit starts afresh: a second one does not continue from the first
            split = torch.randperm(len(z))
            n_held_out = max(1, len(z) // 10)
            held_out, train = z[split[:n_held_out]], z[split[n_held_out:]]
            optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            best, best_weights = self._held_out_loss(held_out), copy.deepcopy(self.net.state_dict())
            checks_since_best = 0
            batches = itertools.islice(_shuffled_batches(len(train), self.batch_size), self.max_steps)
            for step, batch in enumerate(batches, 1):
                loss = self.loss(train[batch]).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % self.check_every and step < self.max_steps:
                    continue
                if (held_out_loss := self._held_out_loss(held_out)) < best:  # never, once the loss is nan
                    best, best_weights, checks_since_best = held_out_loss, copy.deepcopy(self.net.state_dict()), 0
                elif (checks_since_best := checks_since_best + 1) == self.patience:
                    break
        self.net.load_state_dict(best_weights)
        return self

    def prepare(self, codes: Tensor) -> Tensor:
        """What the net is fitted to: the codes standardised, keeping their mean and std."""
        self.mean, self.std = codes.mean(0), codes.std(0).clamp_min(1e-6)  # a constant dimension stays finite
        return self.standardise(codes)

    @torch.no_grad()
    def _held_out_loss(self, held_out: Tensor) -> float:
        return self.loss(held_out).mean().item()

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, **{f"net.{k}": v for k, v in self.net.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> "NetSampler":
        self.mean, self.std = state["mean"], state["std"]
        self.net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        return self


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread meanwhile: the small nets' ops gain little from more, and threads that wait for a busy
    CPU slow each one down many times over (10-50x on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _shuffled_batches(n: int, size: int) -> Iterator[Tensor]:
    """Indices of batches of `size` of range(n), a new random order each pass over it, without end."""
    while True:
        yield from torch.randperm(n).split(size)


class AutoregressiveLayer(nn.Module):
    """One layer of a masked autoregressive flow: u_i = (x_i - shift_i) * exp(-log_scale_i), where shift_i and
    log_scale_i depend only on the x_j before x_i in `order`, computed for all i at once by a MADE (nets.py)."""

    def __init__(self, order: Tensor, hidden: int):
        super().__init__()
        self.order, self.positions = order, torch.argsort(order)  # positions: where each dim sits in `order`
        self.made = MADE(len(order), (hidden, hidden), outputs=2)

    def shift_and_log_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.made(x[..., self.order])[..., self.positions].unbind(-2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u, and log|det du/dx| of each row."""
        shift, log_scale = self.shift_and_log_scale(x)
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(-1)

    def inverse(self, u: Tensor) -> Tensor:
        """x from u, one dimension at a time in `order`: x_i needs the x_j before it."""
        x = torch.zeros_like(u)
        for i in self.order:
            shift, log_scale = self.shift_and_log_scale(x)
            x[:, i] = u[:, i] * torch.exp(log_scale[:, i]) + shift[:, i]
        return x


class MAF(nn.Module):
    """A stack of MADE layers, each in the reverse order of the one before, over a N(0, I) base."""

    def __init__(self, dim: int, n_layers: int, hidden: int):
        super().__init__()
        order = torch.arange(dim)
        self.layers = nn.ModuleList(
            AutoregressiveLayer(order.flip(0) if k % 2 else order, hidden) for k in range(n_layers)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u = the base point of x, and log|det du/dx| of each row."""
        log_det = torch.zeros(len(x))
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, u: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u

    def log_prob(self, x: Tensor) -> Tensor:
        u, log_det = self(x)
        return self.base_log_prob(u) + log_det

    @staticmethod
    def base_log_prob(u: Tensor) -> Tensor:
        """log N(u; 0, I) of each row."""
        return -0.5 * (u.square().sum(-1) + u.shape[-1] * math.log(2 * math.pi))


class MAFSampler(NetSampler):
    """A masked autoregressive flow (Papamakarios et al., 2017, "Masked autoregressive flow for density estimation"):
    `n_layers` MADE layers (Germain et al., 2015) of `hidden` units, the order reversed from one to the next, over a
    N(0, I) base (without the paper's optional batch-norm layers), fitted to the standardised codes by maximum
    likelihood (NetSampler). `log_prob` is the codes' exact log-density; `draw` inverts the flow from N(0, I) noise,
    one dimension at a time in each layer."""

    def __init__(self, dim: int, n_layers: int = 5, hidden: int = 64, max_steps: int = 1000, seed: int = 0):
        super().__init__(dim, lambda: MAF(dim, n_layers, hidden), max_steps, seed)

    def loss(self, z: Tensor) -> Tensor:
        return -self.net.log_prob(z)

    def to_base(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """The flow's forward map, standardising included: the base point u of each code, and log|det du/dcode|."""
        u, log_det = self.net(self.standardise(codes))
        return u, log_det - self.std.log().sum()

    @torch.no_grad()
    @_one_thread()  # a pass a dimension and layer: many small steps
    def from_base(self, u: Tensor) -> Tensor:
        """The inverse of `to_base`: codes from base points."""
        return self.net.inverse(u) * self.std + self.mean

    def log_prob(self, codes: Tensor) -> Tensor:
        """log p(code) of each code, nats: the standardised code's, less the log-std of each dimension."""
        return self.net.log_prob(self.standardise(codes)) - self.std.log().sum()

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.from_base(torch.randn(n, self.dim, generator=generator))


class IAFSampler(MAFSampler):
    """An inverse autoregressive flow (Kingma et al., 2016), as pythae's IAF sampler: the MAF's layers run the other
    way, from a N(0, I) base point u to a code in one pass per layer (`from_base`), so drawing is fast and the
    density needs the sequential inverse: log p(code) = log N(u) - log|det dcode/du| with u = to_base(code), one
    dimension at a time in each layer. Fitted by maximum likelihood through that inverse (NetSampler)."""

    def to_base(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        u = self.net.inverse(self.standardise(codes))
        return u, -(self.net(u)[1] + self.std.log().sum())

    @torch.no_grad()
    def from_base(self, u: Tensor) -> Tensor:
        return self.net(u)[0] * self.std + self.mean

    def loss(self, z: Tensor) -> Tensor:
        u = self.net.inverse(z)
        return -(self.net.base_log_prob(u) - self.net(u)[1])

    def log_prob(self, codes: Tensor) -> Tensor:
        u, log_det = self.to_base(codes)
        return self.net.base_log_prob(u) + log_det


class SecondStageVAE(nn.Module):
    """A VAE over vectors: q(u|z) = N(mean, diag(exp(log_var))) and p(z|u) = N(decoder(u), gamma I), gamma learned,
    with as many latent dimensions as z has, both nets MLPs of two hidden ReLU layers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.encoder = _mlp(dim, hidden, 2 * dim)
        self.decoder = _mlp(dim, hidden, dim)
        self.log_gamma = nn.Parameter(torch.zeros(()))

    def elbo(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The ELBO of each row of z, nats, with one draw u ~ q(u|z) (its noise from `generator`)."""
        mean, log_var = self.encoder(z).chunk(2, -1)
        u = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator)
        squared_error = (z - self.decoder(u)).square()
        log_likelihood = -0.5 * (squared_error / self.log_gamma.exp() + self.log_gamma + math.log(2 * math.pi))
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var)
        return log_likelihood.sum(-1) - kl.sum(-1)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    layers = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers)


class TwoStageSampler(NetSampler):
    """The second stage of a two-stage VAE (Dai & Wipf, 2019, "Diagnosing and enhancing VAE models"): a VAE over the
    standardised codes (SecondStageVAE, `hidden` units a layer: smaller than the authors' three layers of 1024, to fit
    in seconds on a CPU), its own latent u of the codes' size and a Gaussian decoder of learned variance gamma, fitted
    by its ELBO (NetSampler). Its aggregate posterior q(u) is closer to N(0, I) than the first stage's q(z) is, so
    `draw` decodes u ~ N(0, I): z ~ p(z|u), the decoder's mean plus N(0, gamma I) noise, as the authors' code draws
    the second stage (`generate` in github.com/daib13/TwoStageVAE). The mean alone would miss gamma of each
    standardised dimension's variance, which need not vanish: on Gaussian codes the ELBO is the same for every gamma up
    to the codes' smallest correlation eigenvalue, and gamma stops there."""

    def __init__(self, dim: int, hidden: int = 128, max_steps: int = 1000, seed: int = 0):
        super().__init__(dim, lambda: SecondStageVAE(dim, hidden), max_steps, seed)

    def loss(self, z: Tensor) -> Tensor:
        return -self.net.elbo(z)

    def elbo(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A lower bound on log p(code) of each code, nats: the ELBO of the standardised code, less the log-std of
        each dimension (the standardising's log-determinant)."""
        return self.net.elbo(self.standardise(codes), generator) - self.std.log().sum()

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        decoded = self.net.decoder(torch.randn(n, self.dim, generator=generator))
        noise = torch.randn(n, self.dim, generator=generator) * torch.exp(0.5 * self.net.log_gamma)
        return (decoded + noise) * self.std + self.mean


def make_sampler(name: str, dim: int, n_components: int = 10, seed: int = 0) -> Sampler:
    """An unfitted sampler of SAMPLERS by name."""
    samplers: dict[str, Callable[[], Sampler]] = {
        "prior": lambda: Sampler(dim),
        "gaussian": lambda: GaussianSampler(dim),
        "gmm": lambda: GMMSampler(dim, n_components, seed),
        "maf": lambda: MAFSampler(dim, seed=seed),
        "iaf": lambda: IAFSampler(dim, seed=seed),
        "two_stage": lambda: TwoStageSampler(dim, seed=seed),
    }
    if name not in samplers:
        raise UserError(f"{name} is no sampler. Use any of {', '.join(CODE_SAMPLERS)}.")
    return samplers[name]()


class CodePrior(Sampler):
    """A VQ-VAE's prior: an autoregressive model of its codes' codebook indices, token by token (a GRU over the
    `n_tokens` positions, each predicting the next index from the ones before), fitted to the training codes by
    cross-entropy. Draws indices position by position and returns their codebook vectors, flattened."""

    needs_fit = True

    def __init__(self, codebook: Tensor, n_tokens: int, hidden: int = 128, epochs: int = 30, seed: int = 0):
        super().__init__(n_tokens * codebook.shape[1])
        self.codebook, self.n_tokens, self.epochs, self.seed = codebook.detach().cpu(), n_tokens, epochs, seed
        size = len(codebook)
        with torch.random.fork_rng(devices=[]):  # seeded weights, leaving the caller's random state as it was
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(size + 1, hidden)  # index `size` is the start token
            self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden, size)

    def _logits(self, tokens: Tensor) -> Tensor:
        start = torch.full((len(tokens), 1), len(self.codebook), dtype=torch.long)
        return self.head(self.rnn(self.embed(torch.cat([start, tokens[:, :-1]], 1)))[0])

    def fit(self, codes: Tensor) -> "CodePrior":
        tokens = nearest_codes(codes.detach().cpu().view(len(codes), self.n_tokens, -1), self.codebook)
        modules = torch.nn.ModuleList([self.embed, self.rnn, self.head])
        optimizer = torch.optim.Adam(modules.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.enable_grad():
            for _ in range(self.epochs):
                for batch in torch.randperm(len(tokens), generator=generator).split(256):
                    logits = self._logits(tokens[batch])
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[batch].flatten())
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        return self

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        tokens = torch.zeros(n, self.n_tokens, dtype=torch.long)
        for position in range(self.n_tokens):
            probs = self._logits(tokens)[:, position].softmax(-1)
            tokens[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return self.codebook[tokens].flatten(1)

    def state_dict(self) -> dict[str, Tensor]:
        modules = {"embed": self.embed, "rnn": self.rnn, "head": self.head}
        return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> "CodePrior":
        for name in ("embed", "rnn", "head"):
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        return self


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """The index of the nearest codebook vector (K, E) to each of z's vectors (..., E)."""
    return torch.cdist(z.reshape(-1, z.shape[-1]), codebook).argmin(1).view(z.shape[:-1])


class PixelCNNPrior(NetSampler):
    """A quantised model's prior as the VQ-VAE paper fits one: a gated PixelCNN (nets.GatedPixelCNN) over the grid of
    each code's tokens, the index of the nearest of `vectors` (K, E) to each of its `n_tokens` vectors. The codes
    here have no spatial layout (every encoder ends in a flat code), so the tokens are folded row by row into the
    squarest grid that holds them (4 tokens: 2 x 2), with as many more layers as the grid needs for each token to see
    every earlier one. Fitted by cross-entropy (NetSampler: held-out tokens stop it);
    draws tokens in raster order and returns their vectors, flattened, which the model's quantiser leaves as they
    are."""

    def __init__(self, vectors: Tensor, n_tokens: int, channels: int = 32, layers: int = 4, max_steps: int = 1000,
                 seed: int = 0):  # fmt: skip
        self.vectors, self.n_tokens = vectors.detach().cpu(), n_tokens
        self.grid = token_grid(n_tokens)
        layers = max(layers, max(self.grid) - 1)  # each layer reaches one more row up and column left
        super().__init__(n_tokens * vectors.shape[1], lambda: GatedPixelCNN(len(vectors), channels, layers), max_steps,
                         seed)  # fmt: skip

    def prepare(self, codes: Tensor) -> Tensor:
        """Each code's tokens, (N, H, W)."""
        return nearest_codes(codes.view(len(codes), self.n_tokens, -1), self.vectors).view(-1, *self.grid)

    def loss(self, tokens: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(self.net(tokens), tokens, reduction="none").flatten(1).sum(1)

    def log_prob(self, codes: Tensor) -> Tensor:
        """log p(tokens) of each code, nats: the sum over its tokens of log p(token | the tokens before it)."""
        return -self.loss(self.prepare(codes.detach().float().cpu()))

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        tokens = torch.zeros(n, *self.grid, dtype=torch.long)
        for i, j in itertools.product(*map(range, self.grid)):
            probs = self.net(tokens)[:, :, i, j].softmax(1)
            tokens[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return self.vectors[tokens.flatten(1)].flatten(1)


def token_grid(n_tokens: int) -> tuple[int, int]:
    """The squarest (rows, columns) grid of n_tokens positions."""
    rows = max(r for r in range(1, math.isqrt(n_tokens) + 1) if n_tokens % r == 0)
    return rows, n_tokens // rows
