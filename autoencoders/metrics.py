"""Sample quality and latent usage: FID and KID in the feature space of a small classifier trained on the data, with
their noise floor, and active units.

Inception weights cannot be downloaded, so FID and KID use `FeatureNet`: a CNN classifier trained on the full train
split of the dataset being scored (which `data.split_seed` alone fixes). It is trained once per dataset and training
setting and cached, keyed by a hash of those images and settings, never by a run's seed. Its accuracy on the scored
split is reported beside every FID. Samples are scored against the real images of the split being evaluated, so val and
test give two independent checks; `fid_floor` is what as many training images score against the same split, i.e. what
a generator that reproduces its training images would score with as many samples (the feature net was trained on
them too, so a generator of new images can score below it).
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
from torchmetrics.image.kid import KernelInceptionDistance

from autoencoders.data import ImageDataModule
from autoencoders.files import save_cache
from autoencoders.samplers import SAMPLERS

log = logging.getLogger(__name__)

# Every number evaluate.py writes, as `<split>/<name>` (split: val or test), in report order:
# name -> (higher is better, or None for a count; meaning). `{sampler}`: one of samplers.py's (evaluate's `samplers`).
METRICS: dict[str, tuple[bool | None, str]] = {
    "nll": (False, "VAEs: -log p(x) bounded by importance sampling (IWAE, k samples), nats per image"),
    "bpd": (False, "VAEs: nll in bits per dimension (nll / (pixels x channels x ln 2))"),
    "nll_k": (True, "VAEs: importance samples behind nll (evaluate.py's k; train.py's model.nll_samples)"),
    "elbo": (True, "VAEs: evidence lower bound (KL weight 1), nats per image"),
    "recon": (False, "AEs: -log p(x | decode(encode(x))); VAEs: E_q[-log p(x|z)]; nats per image"),
    "kl": (False, "VAEs: KL(q(z|x) || p(z)), nats per image (a one-sample estimate where it has no closed form)"),
    "active_units": (True, "VAEs: latent dims u with Cov_x(E_q[z_u|x]) > 0.01 (Burda et al.)"),
    "perplexity": (
        True,
        "VQ-VAEs: exp of the entropy of the codebook's use over the split's tokens (at most its size)",
    ),
    "usage": (True, "VQ-VAEs: share of the codebook's vectors that the split's tokens use"),
    "mig": (True, "data with factors: mutual information gap of the codes (Chen et al., 2018), 0-1"),
    "dci_disentanglement": (True, "data with factors: DCI disentanglement (Eastwood & Williams, 2018), 0-1"),
    "dci_completeness": (True, "data with factors: DCI completeness, 0-1"),
    "dci_informativeness": (True, "data with factors: DCI informativeness, held-out accuracy of factors from codes"),
    "sap": (True, "data with factors: separated attribute predictability (Kumar et al., 2018), 0-1"),
    "factorvae_score": (True, "data with factors: FactorVAE score (Kim & Mnih, 2018), majority-vote accuracy"),
    "mse": (False, "squared error of the mean reconstruction per pixel, images in [0, 1] (not a likelihood)"),
    "fid_{sampler}": (False, "FID of decoded samples against this split's real images, in the feature net's space"),
    "kid_{sampler}": (False, "KID (unbiased, mean over subsets) of decoded samples against this split's real images"),
    "kid_{sampler}_std": (False, "std of KID over its subsets"),
    "fid_floor": (False, "FID of as many training images against this split's: what reproducing them would score"),
    "kid_floor": (False, "KID of as many training images against this split's"),
    "kid_floor_std": (False, "std of kid_floor over its subsets"),
    "fid_samples": (None, "count: the decoded samples each sampler's FID and KID used (and the floor's train images)"),
    "fid_real": (None, "count: the real images of this split that FID, KID and their floor are measured against"),
    "fid_net_accuracy": (True, "accuracy (0-1) on this split of the classifier whose features FID and KID use"),
}


COUNTS = tuple(name for name, (higher, _) in METRICS.items() if higher is None)  # said beside the scores, not ranked


def metric_key(name: str) -> str:
    """The METRICS entry of a metric name, e.g. fid_{sampler} for val/fid_prior (a name of its own first: fid_floor)."""
    base = name.split("/", 1)[-1]
    if base in METRICS:
        return base
    for key in METRICS:
        prefix, placeholder, suffix = key.partition("{sampler}")
        sampler = base.removeprefix(prefix).removesuffix(suffix)
        if placeholder and sampler in SAMPLERS and prefix + sampler + suffix == base:
            return key
    raise KeyError(name)


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
) -> FeatureNet:
    """The FID feature net for `data`, trained on its full train split once and then read from the cache."""
    images, labels = data.real_split("full_train")
    path = Path(cache_dir).expanduser() / "fid_features" / f"{_cache_key(images, labels, data, settings, device)}.pt"
    cached = _read_cache(path)
    with torch.random.fork_rng(devices=[]):  # seeded by settings.seed, without disturbing the caller's draws
        torch.manual_seed(settings.seed)
        net = FeatureNet(data.image_shape, data.num_classes, settings.num_features)
        if cached is None:
            log.info("Training the FID feature net on %d train images (cached in %s)", len(images), path)
            train_feature_net(net, images, labels, settings, device)
            save_cache({"state_dict": net.state_dict()}, path, "the FID feature net")
        else:
            net.load_state_dict(cached["state_dict"])
    return net.to(device).eval().requires_grad_(False)


def train_feature_net(net: FeatureNet, images: Tensor, labels: Tensor, settings: FeatureNetSettings, device) -> None:
    """Train `net` as a classifier (Adam, one-cycle schedule, random shifts of up to 2 pixels) for a fixed number of
    epochs: nothing is selected on held-out data."""
    generator = torch.Generator().manual_seed(settings.seed)
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


@torch.no_grad()
def accuracy(net: FeatureNet, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    device = next(net.parameters()).device
    correct = sum(
        (net.logits(x.to(device)).argmax(1).cpu() == y).sum().item()
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    return correct / len(labels)


def _cache_key(
    images: Tensor, labels: Tensor, data: ImageDataModule, settings: FeatureNetSettings, device: torch.device
) -> str:
    """Hash of the train images and labels and the training settings: the dataset's identity, whatever config (or
    seed) produced it; with the torch version and the device type it trains on, which change its weights too."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (images, labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    net_version = 2  # bump when FeatureNet or its training changes, so stale cached nets are not reused
    digest.update(
        json.dumps(
            {"net": net_version, "shape": data.image_shape, "torch": torch.__version__, "device": device.type}
            | asdict(settings),
            sort_keys=True,
        ).encode()
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


class SampleQuality:
    """FID and KID of sets of `sample_size` images against a fixed reference set (a held-out split), in `net`'s feature
    space. The reference features are computed once; each `score` call replaces the other set.

    KID is averaged over `subsets` random subsets of half the smaller set (at most 1000): unbiased, unlike FID, which
    grows as the sample shrinks. Hence `fid_floor`: the score of as many real training images.
    """

    def __init__(self, net: FeatureNet, reference: Tensor, sample_size: int, batch_size: int, subsets: int = 100):
        device = next(net.parameters()).device
        # subsets of half the smaller set, at most 1000: of the whole set, every subset would be the same one
        subset_size = max(2, min(2000, sample_size, len(reference)) // 2)
        # normalize=True: inputs are floats in [0, 1]; with a custom net torchmetrics passes them on unchanged.
        with warnings.catch_warnings():  # that KID keeps its features: a few thousand small vectors here
            warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted")
            self.metrics = [
                FrechetInceptionDistance(feature=net, reset_real_features=False, normalize=True).to(device),
                KernelInceptionDistance(
                    feature=net, subsets=subsets, subset_size=subset_size, reset_real_features=False, normalize=True
                ).to(device),
            ]
        self.device = device
        with torch.no_grad():
            for batch in reference.split(batch_size):
                for metric in self.metrics:
                    metric.update(batch.to(device), real=True)

    @torch.no_grad()
    def score(self, images: Iterable[Tensor], seed: int = 0) -> dict[str, float]:
        """`fid`, `kid` and `kid_std` of `images` (batches of `sample_size` images in all)."""
        fid, kid = self.metrics
        for metric in self.metrics:
            metric.reset()
        for batch in images:
            for metric in self.metrics:
                metric.update(batch.to(self.device), real=False)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets from torch's global generator
            torch.manual_seed(seed)
            kid_mean, kid_std = kid.compute()
        return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


def active_units(posterior_means: Tensor, threshold: float = 0.01) -> int:
    """Burda et al. (2016): latent unit u is active if Cov_x(E_q[z_u|x]) > threshold. `posterior_means`: (N, D)."""
    return int((posterior_means.var(0) > threshold).sum())
