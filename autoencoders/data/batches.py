"""A split in memory and its batches: uint8 images cut by index, on the split's device."""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from autoencoders import seeds
from autoencoders.errors import UserError


@dataclass
class ImageSplit:
    """One split: uint8 images (N x C x H x W, 255 = white; binarised images are 0 or 255), int64 labels, and the
    images' factor value indices (N x K int64) for data made from known factors (SourceData.factors), else None."""

    images: Tensor
    labels: Tensor
    factors: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Tensor | slice) -> "ImageSplit":
        return ImageSplit(self.images[index], self.labels[index], None if self.factors is None else self.factors[index])

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes + (0 if self.factors is None else self.factors.nbytes)

    def to(self, device: torch.device) -> "ImageSplit":
        factors = None if self.factors is None else self.factors.to(device)
        return ImageSplit(self.images.to(device), self.labels.to(device), factors)


class Resumable:
    """What Lightning asks of a training loader to resume it inside an epoch: these hold no state of their own, since
    their position is the trainer's batch progress, restored with its loops (Batches.position)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class Batches(Resumable):
    """One process's share of a split, as (uint8 images, labels) batches: what a DataLoader would serve, with no
    host-device sync and no duplicates.

    Training (`shuffle_seed` set): each pass draws a permutation on the split's device from the stream (shuffle_seed,
    "order", epoch), the same on every process; process `rank` of `world` takes every world-th image of it, trimmed so
    that all processes take equally many steps. `position()` says which epoch a pass is and how many of its batches
    were already trained: a run resumed from inside an epoch goes on with that epoch's next batch, exactly as a run
    that never stopped.

    Held-out splits are cut in order into batches of `batch_size` (smaller if there are fewer batches than processes),
    and process `rank` takes batches rank, rank + world, ... (`split_position`): every image exactly once, where
    Lightning's DistributedSampler would pad with repeats. A split kept on the host is
    cut into pinned memory, so its copy to the accelerator does not block.
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        shuffle_seed: int | None = None,
        position: Callable[[], tuple[int, int]] | None = None,
        pin: bool = False,
    ):
        if len(split) < world:
            raise UserError(
                f"A split of {len(split)} images cannot be shared by {world} processes. Use more images, larger "
                "data.val_fraction / data.test_fraction, or fewer trainer.devices."
            )
        self.split, self.rank, self.world, self.pin = split, rank, world, pin
        self.shuffle_seed, self.position, self._passes = shuffle_seed, position, 0
        if shuffle_seed is None:
            self.batch_size = min(batch_size, len(split) // world)
            self._count = len(range(rank, math.ceil(len(split) / self.batch_size), world))
        else:
            self.batch_size = batch_size
            self._count = math.ceil(len(split) // world / batch_size)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.shuffle_seed is None:
            images, labels = self.split.images, self.split.labels
            for position in range(self.rank, self.rank + self._count * self.world, self.world):
                cut = slice(position * self.batch_size, (position + 1) * self.batch_size)
                yield self._pinned(images[cut]), self._pinned(labels[cut])
            return
        yield from self.shuffled(*self.next_pass())

    def next_pass(self) -> tuple[tuple[int], int]:
        """The key of the next training pass's order, (epoch,), and how many of its batches were trained already
        (`position`; without one, passes are counted from 0 and start at their first batch)."""
        epoch, done = self.position() if self.position is not None else (self._passes, 0)
        self._passes += 1
        return (epoch,), done

    def shuffled(self, key: tuple[int, ...], start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's batches of the order drawn from the stream (shuffle_seed, "order", *key), from its
        `start`-th batch on."""
        images, labels = self.split.images, self.split.labels
        assert self.shuffle_seed is not None
        generator = seeds.generator(self.shuffle_seed, "order", *key, device=images.device)
        order = torch.randperm(len(images), generator=generator, device=images.device)
        mine = order[self.rank :: self.world][: len(images) // self.world]
        for index in mine[start * self.batch_size :].split(self.batch_size):
            yield self._pinned(images.index_select(0, index)), self._pinned(labels.index_select(0, index))

    def _pinned(self, t: Tensor) -> Tensor:
        return t.pin_memory() if self.pin else t


class SemiSupervisedBatches(Resumable):
    """Batches of every training image (`unlabelled`, their labels replaced by -1), each with a batch of the labelled
    images (`labelled`) before it: one epoch is a pass over the unlabelled images, while the labelled ones are
    cycled, each cycle in a new order drawn from (seed, "order", epoch, cycle). Both are cut on the same device; a
    pass resumed inside an epoch (Batches.position) goes on where both left off."""

    def __init__(self, unlabelled: Batches, labelled: Batches):
        self.unlabelled, self.labelled = unlabelled, labelled

    def __len__(self) -> int:
        return len(self.unlabelled)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        (epoch,), done = self.unlabelled.next_pass()
        cycle, offset = divmod(done, len(self.labelled))
        labelled = self.labelled.shuffled((epoch, cycle), offset)
        for images, labels in self.unlabelled.shuffled((epoch,), done):
            batch = next(labelled, None)
            if batch is None:  # the labelled images' next cycle
                cycle += 1
                labelled = self.labelled.shuffled((epoch, cycle))
                batch = next(labelled)
            yield torch.cat([batch[0], images]), torch.cat([batch[1], torch.full_like(labels, -1)])


def split_position(batch_idx: int, rank: int, world: int) -> int:
    """Which batch of a held-out split the `batch_idx`-th one of process `rank` is (see Batches): the same images
    whatever the number of processes, so per-batch random draws seeded by it are too."""
    return batch_idx * world + rank


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 images (0-255) as float32 in [0, 1]."""
    return images.float().div_(255)
