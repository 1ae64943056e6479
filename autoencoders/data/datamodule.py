"""Image data: one LightningDataModule fed by interchangeable sources (bundled MNIST subset, torchvision sets, folders,
sprites made in code).

Every split lives in memory as uint8 images (N x C x H x W) with int64 labels, on the accelerator when it fits under
`device_cap_gb`. Batches are cut from them by index, with the order drawn on the split's device, and become float images
in [0, 1] per batch, on the device (`on_after_batch_transfer`): nothing is loaded per sample and nothing syncs the host.

The train/val/test split depends on `split_seed` alone, so every run of a study, whatever its `seed`, is scored on the
same held-out images, and no image that one run trains on is another run's validation or test image.
"""

import hashlib
from collections.abc import Sequence
from itertools import pairwise

import lightning as L
import numpy as np
import torch
from torch import Tensor

from autoencoders import config, seeds
from autoencoders.data.augment import Augmentation
from autoencoders.data.batches import Batches, ImageSplit, SemiSupervisedBatches, to_unit_float
from autoencoders.data.sources import Source
from autoencoders.errors import UserError
from autoencoders.internals import batches_trained

BINARIZE = (None, *config.BINARIZE)  # the values of data.binarize


class ImageDataModule(L.LightningDataModule):
    """Deterministic, label-stratified train/val/test splits of any `Source`, served as in-memory (x, y) batches
    (`Batches`): float images in [0, 1] and int64 labels.

    With an official test split the source's test set is used as is and val is carved out of train (`val_fraction`);
    otherwise val and test are both carved out (`val_fraction`, `test_fraction`). The split depends on `split_seed`
    only. `labels_per_class` then keeps that many training images per class, drawn with `seed` from the fixed train
    split (for few-label studies), and `val_labels_per_class` as many validation images per class (a realistic
    few-label protocol selects on no more labels than it trains on; conf/data sets it to `labels_per_class`; null
    keeps val whole). Test stays whole. For one seed, the subsets for a smaller `labels_per_class` are contained in
    those for a larger one.

    `binarize` (Burda et al.'s protocol for binary likelihoods): `dynamic` draws a fresh Bernoulli sample of each
    training image every time it is used, `static` binarises the training images once; in both cases val and test are
    binarised once with a generator fixed by `split_seed`, so their scores are reproducible. `real_split(split)`
    always returns the grey images, which sample-quality metrics compare against. For data made from known factors
    (data=sprites), `factors(split)` gives each image's factor values, aligned with every split and subset above.
    `augment` (augment=affine: data/augment.py) transforms every training image anew in each step, before a dynamic
    binarisation; validation and test images never.

    On an accelerator, the splits move to its memory once, train first, while their uint8 bytes fit within
    `device_cap_gb` (per process); a split that does not fit stays in host memory and is copied per batch.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    factor_names: tuple[str, ...]  # of the factors each image is made from (`factors`); () for data without them
    factor_sizes: tuple[int, ...]
    train_set: ImageSplit  # what the model sees (binarised if so), uint8
    val_set: ImageSplit
    test_set: ImageSplit
    unlabelled_set: ImageSplit  # every training image (before labels_per_class), for semi-supervised models
    # positions in the source's images of train, full_train (before labels_per_class), val and test (none when the
    # source has its own test set)
    split_index: dict[str, Tensor]

    def __init__(
        self,
        source: Source,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        labels_per_class: int | None = None,
        val_labels_per_class: int | None = None,
        probe_labels_per_class: int = 10,
        split_seed: int = 0,
        seed: int = 0,
        binarize: str | None = None,
        device_cap_gb: float = 4.0,
        augment: Augmentation | None = None,
    ):
        super().__init__()  # each value is in its range (config.DataConfig): only their relation is checked here
        if val_fraction + test_fraction >= 1:
            raise UserError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
                "training data; keep their sum below 1, e.g. 0.1 each."
            )
        self.save_hyperparameters(ignore=["source", "augment"], logger=False)
        self.source, self.augment = source, augment
        self._device: torch.device | None = None  # the accelerator that _move_to copied the splits to that fit
        self._on_device: dict[str, ImageSplit] = {}

    def state_dict(self) -> dict[str, Tensor]:
        """The images the model trains on travel in checkpoints, so a classifier can check that the autoencoder whose
        encoder it uses never trained on its validation or test images (`held_out_overlap`): the training split, and
        for a semi-supervised model (M2) every training image, labelled or not. (The shuffle needs no state: each
        epoch's order is drawn from (seed, epoch), so a resumed run draws what a run that never stopped would.)"""
        model = self.trainer.lightning_module if self.trainer is not None else None
        seen = "full_train" if getattr(model, "semi_supervised", False) else "train"
        return {
            "source": self.source.identity,
            "train_index": self.split_index[seen],
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """A hash of the grey images and labels of the splits as set up (train before labels_per_class, val, test).
        Checkpoints carry it (`state_dict`), so evaluate.py can tell that the data changed since training: an image
        folder with files added, removed or edited is split anew, and its test split is no longer the run's."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.blake2b(digest_size=8)
            for name in ("full_train", "val", "test"):
                for tensor in (self._real[name].images, self._real[name].labels):
                    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        pass

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        hp = self.hparams
        data = self.source.load()
        images, labels, factors = data.images, data.labels.long(), data.factors

        def cut(index: Tensor) -> ImageSplit:  # the images at these positions, with their labels and factors
            return ImageSplit(images[index], labels[index], None if factors is None else factors[index])

        split = torch.Generator().manual_seed(hp.split_seed)
        if data.test_images is None:
            val, test, train = _stratified_split(labels, [hp.val_fraction, hp.test_fraction], split)
            test_split = cut(test)
        else:
            (val, train), test = _stratified_split(labels, [hp.val_fraction], split), None
            test_split = ImageSplit(data.test_images, data.test_labels.long())
        for name, size in (("train", len(train)), ("val", len(val)), ("test", len(test_split))):
            if size == 0:
                raise UserError(
                    f"The {name} split of {len(labels)} images is empty. Use more images, or adjust "
                    f"data.val_fraction={hp.val_fraction} / data.test_fraction={hp.test_fraction}."
                )
        full_train = train
        if hp.labels_per_class is not None:
            chosen = seeds.generator(hp.seed, "labels_per_class")
            train = train[_per_class(labels[train], hp.labels_per_class, data.num_classes, chosen, "labels_per_class")]
        kept_val = slice(None)  # positions in the val split that stay
        if hp.val_labels_per_class is not None:  # its own stream: the same images whatever labels_per_class is
            chosen = seeds.generator(hp.seed, "val_labels_per_class")
            kept_val = _per_class(
                labels[val], hp.val_labels_per_class, data.num_classes, chosen, "val_labels_per_class"
            )
        self.split_index = {"train": train, "val": val, **({} if test is None else {"test": test})}
        self.split_index["full_train"] = full_train  # what a semi-supervised model trains on
        # The grey images of every split, which sample quality is measured against ...
        self._real = {"full_train": cut(full_train), "val": cut(val), "test": test_split}
        self._real["train"] = self._real["full_train"] if train is full_train else cut(train)
        # ... and what the model sees: binarised once with a generator fixed by split_seed (val, test, and train if
        # static; a dynamic train split is binarised per batch, in on_after_batch_transfer), or the grey images.
        binarized = torch.Generator().manual_seed(hp.split_seed)
        held_out = {name: self._binarized(name, binarized) for name in ("val", "test")}
        self.train_set = self._binarized("train", binarized) if hp.binarize == "static" else self._real["train"]
        # every training image, its label unused: a semi-supervised model's unlabelled images
        if train is full_train:
            self.unlabelled_set = self.train_set
        elif hp.binarize == "static":
            self.unlabelled_set = self._binarized("full_train", binarized)
        else:
            self.unlabelled_set = self._real["full_train"]
        # the val subset is cut after binarising the whole split, so the test split's binary draws never depend on it
        self.val_set, self.test_set = held_out["val"][kept_val], held_out["test"]
        self._real["val"], self.split_index["val"] = self._real["val"][kept_val], val[kept_val]
        self.image_shape = tuple(images.shape[1:])
        self.num_classes = data.num_classes
        self.factor_names, self.factor_sizes = data.factor_names, data.factor_sizes

    def _binarized(self, split: str, generator: torch.Generator) -> ImageSplit:
        real = self._real[split]
        if self.hparams.binarize is None:
            return real
        binary = torch.bernoulli(to_unit_float(real.images), generator=generator).to(torch.uint8).mul_(255)
        return ImageSplit(binary, real.labels, real.factors)

    def real_split(self, split: str) -> tuple[Tensor, Tensor]:
        """The grey images (float, in [0, 1]) and labels of `split` (train, val, test, or full_train: the train split
        before labels_per_class), whatever `binarize` is."""
        real = self._real[split]
        return to_unit_float(real.images), real.labels

    def factors(self, split: str) -> Tensor | None:
        """The factor value indices (N x K int64; column k names `factor_names[k]` and lies in range(factor_sizes[k]))
        of `split` (train, val, test or full_train), row for row those of `real_split(split)` and `inputs(split)`; None
        for data without factors."""
        return self._real[split].factors

    def probe_split(self) -> tuple[Tensor, Tensor]:
        """`probe_labels_per_class` labelled images per class of the whole training split (drawn with `seed`), as the
        model sees them (binarised once if so), and their labels: what +callbacks=probe votes with."""
        images, labels = self._real["full_train"].images, self._real["full_train"].labels
        chosen = seeds.generator(self.hparams.seed, "probe_labels_per_class")
        chosen = _per_class(
            labels, self.hparams.probe_labels_per_class, self.num_classes, chosen, "probe_labels_per_class"
        )
        x = to_unit_float(images[chosen])
        if self.hparams.binarize is not None:
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        return x, labels[chosen]

    def inputs(self, split: str) -> Tensor:
        """The float images in [0, 1] that the model sees of `split` (train, val or test): binarised if so (a dynamic
        train split: its grey images)."""
        return to_unit_float(getattr(self, f"{split}_set").images)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Tensor):  # float images, no labels: the model's example_input_array (model summary)
            return batch
        x, y = batch
        x = to_unit_float(x)
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return x, y
        # each training batch's draws from streams of its own: the same in a resumed run as in one that never stopped
        position = (*self._training_position(), trainer.global_rank)
        if self.augment is not None:
            x = self.augment(x, seeds.generator(self.hparams.seed, "augment", *position, device=x.device))
        if self.hparams.binarize == "dynamic":
            x = torch.bernoulli(x, generator=seeds.generator(self.hparams.seed, "binarize", *position, device=x.device))
        return x, y

    def held_out_overlap(self, trained_on: dict) -> int:
        """How many of this module's val and test images are in `trained_on["train_index"]` of a run on the same
        source (another module's `state_dict()`): 0 means the held-out images are unseen."""
        if trained_on.get("source") != self.source.identity:
            return 0
        seen = set(trained_on["train_index"].tolist())
        return sum(i in seen for name in ("val", "test") for i in self.split_index.get(name, torch.empty(0)).tolist())

    def train_dataloader(self) -> Batches | SemiSupervisedBatches:
        """The labelled training images; for a model with `semi_supervised` (M2), each batch of every training image
        (labels unused) comes with a batch of the labelled ones (SemiSupervisedBatches)."""
        position = self._training_position if self.trainer is not None else None
        labelled = self._batches("train", shuffle_seed=self.hparams.seed, position=position)
        model = self.trainer.lightning_module if self.trainer is not None else None
        if not getattr(model, "semi_supervised", False):
            return labelled
        unlabelled = self._batches("unlabelled", shuffle_seed=self.hparams.seed, position=position)
        return SemiSupervisedBatches(unlabelled, labelled)

    def _training_position(self) -> tuple[int, int]:
        """The training epoch and how many of its batches were trained (internals.batches_trained): (epoch, 0) at an
        epoch's start, (epoch, k) when a run resumes after the epoch's k-th batch, and a batch's index while it is
        transferred. (Read when a pass starts serving, at its first batch, after Lightning has reset its loops for the
        epoch: Batches.__iter__ is a generator.)"""
        return self.trainer.current_epoch, batches_trained(self.trainer)

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
        for name in ("train", "val", "test", "unlabelled"):
            split = getattr(self, f"{name}_set")
            if split is self.train_set and name == "unlabelled":  # without labels_per_class: the same images
                if "train" in self._on_device:
                    self._on_device[name] = self._on_device["train"]
            elif split.nbytes <= room:
                self._on_device[name], room = split.to(device), room - split.nbytes


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


def _per_class(labels: Tensor, n: int, num_classes: int, generator: torch.Generator, key: str) -> Tensor:
    """Positions of `n` random images of every class (`n` is the setting data.<key>)."""
    order = torch.randperm(len(labels), generator=generator)
    chosen = []
    for label in range(num_classes):
        members = order[labels[order] == label]
        if len(members) < n:
            raise UserError(
                f"data.{key}={n}, but class {label} has only {len(members)} images in that split "
                f"(after the split into train, val and test). Use a smaller {key}, or null for all."
            )
        chosen.append(members[:n])
    return torch.cat(chosen).sort().values
