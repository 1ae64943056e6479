"""Sample quality and latent usage: FID in the feature space of a small classifier trained on the data, active units.

Inception weights cannot be downloaded, so FID uses `FeatureNet`: a CNN classifier trained on the train split of the
dataset being scored. Its test accuracy is reported beside every FID so a reader can judge the feature space. It is
trained once per dataset and training setting, and cached (keyed by a hash of the images and the settings).
"""

import hashlib
import json
import logging
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from autoencoders.data import ImageDataModule, save_cache

log = logging.getLogger(__name__)

# Every number evaluate.py writes, in report order: name -> (higher is better, meaning). `{k}`: importance samples.
METRICS: dict[str, tuple[bool, str]] = {
    "test/fid_prior": (False, "FID of decoded prior samples z ~ N(0, I) against the test images"),
    "test/fid_gaussian": (False, "plain AEs: FID of decoded z ~ a Gaussian fitted to the training codes"),
    "test/fid_net_accuracy": (True, "test accuracy (0-1) of the classifier whose features FID uses"),
    "test/elbo": (True, "VAEs: evidence lower bound (KL weight 1), nats per image"),
    "test/iwae_k{k}": (True, "VAEs: importance-weighted bound log mean_k p(x,z_k)/q(z_k|x), nats per image"),
    "test/recon": (False, "VAEs: E_q[-log p(x|z)] with the training likelihood, nats per image"),
    "test/kl": (False, "VAEs: KL(q(z|x) || N(0, I)), nats per image"),
    "test/active_units": (True, "VAEs: latent dims u with Cov_x(E_q[z_u|x]) > 0.01 (Burda et al.)"),
    "test/bce": (False, "binary cross-entropy of decode(encode(x)), nats per image"),
    "test/mse": (False, "squared error of decode(encode(x)) per pixel, images in [0, 1]"),
}


def metric_names(k: int) -> list[str]:
    return [name.format(k=k) for name in METRICS]


def metric_key(name: str) -> str:
    """The METRICS entry of a metric name, e.g. test/iwae_k{k} for test/iwae_k1000."""
    return next(key for key in METRICS if name.startswith(key.split("{")[0]))


class FeatureNet(nn.Module):
    """A LeNet-style classifier: `forward` returns its hidden layer of `num_features` ReLU units (the FID features,
    as torchmetrics expects of a custom feature extractor), `logits` the class scores it is trained on."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, num_features: int = 128):
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of probing with a dummy image
        self.body = nn.Sequential(
            nn.Conv2d(image_shape[0], 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7),  # a no-op for 28x28 images; bounds the next layer for larger ones
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class FeatureNetSettings:
    """How the FID feature net is trained (conf/evaluate.yaml `fid`); part of its cache key."""

    epochs: int
    batch_size: int
    lr: float
    num_features: int
    seed: int


def feature_net(
    data: ImageDataModule, settings: FeatureNetSettings, cache_dir: str | os.PathLike, device: torch.device
) -> tuple[FeatureNet, float]:
    """The FID feature net for `data` and its accuracy on the test split, trained once and then read from the cache."""
    path = Path(cache_dir).expanduser() / "fid_features" / f"{_cache_key(data, settings)}.pt"
    cached = _read_cache(path)
    with torch.random.fork_rng(devices=[]):  # seeded by settings.seed, without disturbing the caller's draws
        torch.manual_seed(settings.seed)
        net = FeatureNet(data.image_shape, data.num_classes, settings.num_features)
        if cached is None:
            log.info("Training the FID feature net on %d train images (cached in %s)", len(data.train_set), path)
            accuracy = train_feature_net(net, data, settings, device)
            save_cache({"state_dict": net.state_dict(), "accuracy": accuracy}, path, "the FID feature net")
        else:
            net.load_state_dict(cached["state_dict"])
            accuracy = cached["accuracy"]
    return net.to(device).eval().requires_grad_(False), accuracy


def train_feature_net(
    net: FeatureNet, data: ImageDataModule, settings: FeatureNetSettings, device: torch.device
) -> float:
    """Train `net` as a classifier on the train split (Adam, one-cycle schedule, random shifts of up to 2 pixels) and
    return its accuracy on the test split."""
    generator = torch.Generator().manual_seed(settings.seed)
    images, labels = data.train_set.tensors
    steps = settings.epochs * math.ceil(len(images) / settings.batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
    net.to(device).train()
    for _ in range(settings.epochs):
        for index in torch.randperm(len(images), generator=generator).split(settings.batch_size):
            dy, dx = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(images[index], (dy, dx), dims=(2, 3)).to(device)
            loss = F.cross_entropy(net.logits(x), labels[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    images, labels = data.test_set.tensors
    with torch.no_grad():
        correct = sum(
            (net.logits(x.to(device)).argmax(1).cpu() == y).sum().item()
            for x, y in zip(images.split(500), labels.split(500), strict=True)
        )
    return correct / len(labels)


def _cache_key(data: ImageDataModule, settings: FeatureNetSettings) -> str:
    """Hash of the train and test images and labels and the training settings: the dataset's identity, whatever
    config produced it."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (*data.train_set.tensors, *data.test_set.tensors):
        digest.update(tensor.contiguous().numpy().tobytes())
    net_version = 1  # bump when FeatureNet or its training changes, so stale cached nets are not reused
    digest.update(
        json.dumps({"net": net_version, "shape": data.image_shape, **asdict(settings)}, sort_keys=True).encode()
    )
    return digest.hexdigest()


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        warnings.warn(f"Ignoring the unreadable cached FID feature net {path} ({e}); training it again.", stacklevel=3)
        return None


class FrechetDistance:
    """FID between fixed real images and any number of sets of generated images, in `net`'s feature space.

    The real features are computed once; each `score` call replaces the generated ones.
    """

    def __init__(self, net: FeatureNet, real: Tensor, batch_size: int):
        self.device = next(net.parameters()).device
        # normalize=True: inputs are floats in [0, 1]; with a custom net torchmetrics passes them on unchanged.
        self.fid = FrechetInceptionDistance(feature=net, reset_real_features=False, normalize=True).to(self.device)
        with torch.no_grad():
            for batch in real.split(batch_size):
                self.fid.update(batch.to(self.device), real=True)

    @torch.no_grad()
    def score(self, fake: Iterable[Tensor]) -> float:
        self.fid.reset()
        for batch in fake:
            self.fid.update(batch.to(self.device), real=False)
        return self.fid.compute().item()


def active_units(posterior_means: Tensor, threshold: float = 0.01) -> int:
    """Burda et al. (2016): latent unit u is active if Cov_x(E_q[z_u|x]) > threshold. `posterior_means`: (N, D)."""
    return int((posterior_means.var(0) > threshold).sum())
