"""Quantised codes: VQ-VAE (a learned codebook) and FSQ (a fixed grid of levels)."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from autoencoders.errors import UserError
from autoencoders.models.ae import AE
from autoencoders.samplers import CodePrior, PixelCNNPrior, nearest_codes


class Quantised(AE):
    """A model whose codes are `n_tokens` tokens, each one of the vectors of `token_vectors()` (K, E): its samples need
    a prior over tokens fitted to the training codes, the autoregressive CodePrior (`prior_sampler`, evaluate.py's
    `prior`) or a gated PixelCNN (`pixelcnn_sampler`, evaluate.py's `pixelcnn`)."""

    n_tokens: int

    def token_vectors(self) -> Tensor:
        raise NotImplementedError

    def prior_sampler(self) -> CodePrior:
        return CodePrior(self.token_vectors(), self.n_tokens)

    def pixelcnn_sampler(self, seed: int = 0) -> PixelCNNPrior:
        return PixelCNNPrior(self.token_vectors(), self.n_tokens, seed=seed)


class VQVAE(Quantised):
    """VQ-VAE (van den Oord et al., 2017). The encoder's code z_e (latent_dim numbers) is `latent_dim //
    embedding_dim` tokens, each replaced by its nearest of `codebook_size` codebook vectors; the decoder sees those,
    with straight-through gradients. `loss` = recon + commitment * |z_e - sg[e]|^2 (+ |sg[z_e] - e|^2, the codebook
    term, unless `ema`: then the codebook follows exponential moving averages of its tokens, `decay`). The squared
    distances are summed per image (not nats). Logs the codebook's `perplexity` (exp of the entropy of its use in a
    batch) and `usage` (the share of its vectors a batch uses).

    `codebook_init=kmeans` sets the codebook to k-means centroids of the first training batch's tokens (instead of
    N(0, I) draws far from the encoder's codes). A vector whose exponential moving average of use (tokens per step,
    `decay`) falls below `revive_below` is dead: it is moved onto a random token of the batch (`revived` logs how many
    a step moved; 0 turns revival off).

    `encode` returns z_e and `decode` quantizes first. There is no N(0, I) prior: samples come from a CodePrior
    (samplers.py) fitted to the training codes, which evaluate.py fits and caches (`samplers=[prior]`) or
    `prior_sampler().fit(codes)` in Python; until then `sample()` says so instead of decoding noise."""

    def __init__(
        self,
        image_shape: Sequence[int],
        codebook_size: int = 64,
        embedding_dim: int = 4,
        commitment: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        codebook_init: str = "kmeans",
        revive_below: float = 0.01,
        **base: Any,
    ):
        latent_dim = base.get("latent_dim", 16)
        if latent_dim % embedding_dim:
            raise UserError(
                f"model.embedding_dim={embedding_dim} does not divide latent_dim={latent_dim} into tokens. Use a "
                "divisor, e.g. latent_dim=16 model.embedding_dim=4 (4 tokens)."
            )
        super().__init__(image_shape, **base)
        self.n_tokens = latent_dim // embedding_dim
        self.codebook = torch.nn.Parameter(torch.randn(codebook_size, embedding_dim), requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.kmeans_done = False  # in this process; a resumed run (global_step > 0) keeps its codebook

    def tokens(self, z: Tensor) -> Tensor:
        """The codebook index of each of z's tokens, (B, n_tokens)."""
        return nearest_codes(z.view(len(z), self.n_tokens, -1), self.codebook)

    def quantize(self, z: Tensor) -> Tensor:
        """z with each token replaced by its nearest codebook vector (flat, as z)."""
        return self.codebook[self.tokens(z)].flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decoder(self.quantize(z)))

    def decoder_params(self, x: Tensor) -> Tensor:
        return self.decoder(self.quantize(self.encode(x)))

    def token_vectors(self) -> Tensor:
        return self.codebook

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        z = self.encode(x)
        training = split == "train" and self.training
        revived = self._maintain_codebook(z.detach().view(-1, self.codebook.shape[1])) if training else None
        index = self.tokens(z)
        chosen = self.codebook[index].flatten(1)
        recon = self.likelihood.nll(self.decoder(z + (chosen - z).detach()), x).mean()  # straight-through
        commitment = (z - chosen.detach()).pow(2).sum(1).mean()
        terms = {"recon": recon, "commitment": commitment}
        loss = recon + self.hparams.commitment * commitment
        if training:
            self._ema_update(z.detach().view(-1, self.codebook.shape[1]), index.flatten())
            terms["revived"] = revived
        if not self.hparams.ema:
            terms["codebook"] = (z.detach() - chosen).pow(2).sum(1).mean()
            loss = loss + terms["codebook"]
        return {"loss": loss, **terms, **self.codebook_use(index)}

    def codebook_use(self, index: Tensor) -> dict[str, Tensor]:
        """Of the codebook indices `index`: `perplexity`, exp of the entropy of the codebook's use (at most its size),
        and `usage`, the share of its vectors used."""
        use = torch.bincount(index.flatten(), minlength=len(self.codebook)).float() / index.numel()
        entropy = -(use * use.clamp_min(1e-12).log()).sum()  # unused vectors add 0, with no data-dependent shape
        return {"perplexity": entropy.exp(), "usage": (use > 0).float().mean()}

    @torch.no_grad()
    def _ema_update(self, tokens: Tensor, index: Tensor) -> None:
        """The moving averages of each vector's use (always: revival reads them) and, with `ema`, of its tokens' sum,
        which the codebook follows. Under DDP the batch statistics are summed over every process first, so each
        keeps the same codebook: the one a single process would keep on the whole batch."""
        decay, size = self.hparams.decay, len(self.codebook)
        one_hot = torch.nn.functional.one_hot(index, size).type_as(tokens)
        stats = torch.cat([one_hot.sum(0)[:, None], one_hot.T @ tokens], 1)  # per vector: its count, its tokens' sum
        if _distributed():
            torch.distributed.all_reduce(stats)
        self.ema_count.mul_(decay).add_(stats[:, 0], alpha=1 - decay)
        if not self.hparams.ema:
            return
        self.ema_sum.mul_(decay).add_(stats[:, 1:], alpha=1 - decay)
        count = (self.ema_count + 1e-5) / (self.ema_count.sum() + size * 1e-5) * self.ema_count.sum()  # Laplace
        self.codebook.data.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def _maintain_codebook(self, tokens: Tensor) -> Tensor:
        """Before a training step: the k-means initialisation at the first, and the revival of dead vectors; returns
        how many vectors were revived. Under DDP both read the whole batch, every process's tokens, and take process
        0's random draws (each process's global generator is seeded for its rank), so every process keeps the
        codebook that a single process would."""
        if self.hparams.codebook_init == "kmeans" and self.global_step == 0 and not self.kmeans_done:
            self.kmeans_done = True
            every = torch.arange(len(self.codebook), device=tokens.device)
            self._set_vectors(every, _from_rank_zero(kmeans(_whole_batch(tokens), len(self.codebook))))
        dead = torch.nonzero(self.ema_count < self.hparams.revive_below).flatten()
        if len(dead):  # the same on every process: the counts are summed over them
            batch = _whole_batch(tokens)
            picks = _from_rank_zero(torch.randint(len(batch), (len(dead),), device=tokens.device))
            self._set_vectors(dead, batch[picks])
        return torch.tensor(float(len(dead)), device=tokens.device)

    def _set_vectors(self, index: Tensor, vectors: Tensor) -> None:
        """Codebook vectors `index` become `vectors`, each with a moving-average count of one token."""
        self.codebook.data[index] = vectors
        self.ema_sum[index], self.ema_count[index] = vectors, 1.0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _whole_batch(tokens: Tensor) -> Tensor:
    """Every DDP process's `tokens`, in process order (the tokens themselves without DDP)."""
    if not _distributed():
        return tokens
    gathered = [torch.empty_like(tokens) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tokens.contiguous())
    return torch.cat(gathered)


def _from_rank_zero(draws: Tensor) -> Tensor:
    """`draws` as DDP process 0 made them, in every process (`draws` itself without DDP)."""
    if _distributed():
        torch.distributed.broadcast(draws, 0)
    return draws


def kmeans(points: Tensor, k: int, iterations: int = 20) -> Tensor:
    """k centroids of `points` (N, E) by Lloyd's algorithm from k distinct random points (with repeats if N < k); a
    cluster that empties keeps its centroid."""
    centroids = points[torch.randperm(len(points), device=points.device)[:k]]
    if len(centroids) < k:
        centroids = points[torch.randint(len(points), (k,), device=points.device)]
    for _ in range(iterations):
        members = torch.nn.functional.one_hot(nearest_codes(points, centroids), k).type_as(points)  # (N, k)
        counts = members.sum(0)
        centroids = torch.where(counts[:, None] > 0, members.T @ points / counts.clamp_min(1)[:, None], centroids)
    return centroids


MAX_PRIOR_OUTPUTS = 4096  # latent_dim * levels of an FSQ code: its CodePrior's distances and logits per image


def fsq_levels(levels: int) -> Tensor:
    """The values an FSQ code number takes: the integers of `levels` consecutive ones around 0, over levels // 2."""
    return (torch.arange(levels) - levels // 2) / (levels // 2)


class FSQVAE(Quantised):
    """Finite scalar quantisation (Mentzer et al., 2023): each of the encoder's latent_dim numbers is bounded to
    `levels` values (tanh, shifted for an even count) and rounded, with straight-through gradients; the implicit
    codebook is the grid of levels^latent_dim codes, with no codebook or commitment loss, so `loss` = recon. As for a
    VQ-VAE, `encode` returns the numbers before rounding (bounded, about [-1, 1]), `decode` rounds them, and samples
    need a code prior fitted to the training codes (`prior_sampler`, evaluate.py's `prior`). Logs `usage`: the share of
    the levels that a batch's code numbers use, over all numbers.

    The bound is in `encode`, not in `quantize`, so that rounding leaves the levels as they are: the prior's draws are
    levels, and bounding them again would move some (with 4 levels, -1 to -0.5).

    The first `decoder_warmup_steps` training steps train the decoder alone (the codes detached). Otherwise the
    untrained decoder's error on the mean image pushes every image's code the same way into tanh's saturation,
    where Adam, blind to the gradient's scale, keeps pushing it: each number then takes a single level (on the
    bundled digits, recon 206 nats and 1 of 5 levels used, against 91 and all 5 with 50 or 100 warm-up steps)."""

    def __init__(self, image_shape: Sequence[int], levels: int = 5, decoder_warmup_steps: int = 100, **base: Any):
        latent_dim = base.get("latent_dim", 16)
        if latent_dim * levels > MAX_PRIOR_OUTPUTS:
            raise UserError(
                f"model.levels={levels} with latent_dim={latent_dim} is more than the code prior that samples, FID and "
                f"KID draw from can serve: it weighs every level of each code number, latent_dim * model.levels = "
                f"{latent_dim * levels:,} numbers per image, and serves at most {MAX_PRIOR_OUTPUTS}. Use fewer levels, "
                "e.g. model.levels=5 (the FSQ paper uses 5 to 8)."
            )
        super().__init__(image_shape, **base)

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's numbers bounded to the levels' range as in the FSQ paper's code: an even count's levels are
        asymmetric (-L/2 .. L/2 - 1), and the shift keeps 0 at 0."""
        levels = self.hparams.levels
        half_width = (levels - 1) * (1 + 1e-3) / 2  # 1 + eps: offset / half_width < 1 for atanh with 2 levels
        offset = 0.5 if levels % 2 == 0 else 0.0
        bounded = torch.tanh(super().encode(x) + math.atanh(offset / half_width)) * half_width - offset
        return bounded / (levels // 2)

    def quantize(self, z: Tensor) -> Tensor:
        """z rounded to the nearest level (straight-through), exactly the identity on the levels."""
        half = self.hparams.levels // 2
        rounded = torch.round(z * half).clamp(-half, self.hparams.levels - 1 - half) / half
        return rounded + (z - z.detach())  # adds an exact 0: the value stays a level

    def decode(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decoder(self.quantize(z)))

    def decoder_params(self, x: Tensor) -> Tensor:
        return self.decoder(self.quantize(self.encode(x)))

    @property
    def n_tokens(self) -> int:
        """One token per code number, its level."""
        return self.latent_dim

    def token_vectors(self) -> Tensor:
        return fsq_levels(self.hparams.levels)[:, None]

    def loss_terms(self, x: Tensor, split: str = "train") -> dict[str, Tensor]:
        codes = self.quantize(self.encode(x))
        if split == "train" and self.training and self.global_step < self.hparams.decoder_warmup_steps:
            codes = codes.detach()
        levels = self.hparams.levels
        index = torch.round(codes.detach() * (levels // 2)).long() + levels // 2  # 0 .. levels-1
        used = torch.zeros(self.latent_dim, levels, device=x.device).scatter_(1, index.T, 1.0)
        return {"recon": self.likelihood.nll(self.decoder(codes), x).mean(), "usage": used.mean()}
