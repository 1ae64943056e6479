"""Distributions over an autoencoder's codes to sample new images from: decode z drawn from one of them.

`prior` is N(0, I), a VAE's prior (and for a plain AE the lecture's "random embedding"). `gaussian` (a full-covariance
Gaussian) and `gmm` (a Gaussian mixture) are fitted to the codes of the training images, ex-post density estimation
as in Ghosh et al. (2020): they give any autoencoder a distribution that its decoder has seen codes from. A fitted
sampler is a few tensors (`state_dict`), so evaluate.py caches it per checkpoint.
"""

import torch
from torch import Tensor

from autoencoders.errors import UserError

SAMPLERS = ("prior", "gaussian", "gmm")
CACHE_VERSION = 1  # bump when a sampler's fit or state changes, so evaluate.py refits instead of reusing stale caches


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


def make_sampler(name: str, dim: int, n_components: int = 10, seed: int = 0) -> Sampler:
    """An unfitted sampler of SAMPLERS by name."""
    if name == "gmm":
        return GMMSampler(dim, n_components, seed)
    return GaussianSampler(dim) if name == "gaussian" else Sampler(dim)


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
