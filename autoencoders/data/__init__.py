"""Image data: sources (sources.py), in-memory splits and their batches (batches.py), and the one
LightningDataModule that every model trains on (datamodule.py); sprites.py makes dSprites-like images in code."""

from autoencoders.data.batches import Batches, ImageSplit, split_position, to_unit_float
from autoencoders.data.datamodule import BINARIZE, ImageDataModule
from autoencoders.data.sources import ImageFolderSource, MNISTSubset, Source, SourceData, TorchvisionSource
from autoencoders.data.sprites import SpritesSource

__all__ = [
    "Batches",
    "ImageSplit",
    "split_position",
    "to_unit_float",
    "BINARIZE",
    "ImageDataModule",
    "ImageFolderSource",
    "MNISTSubset",
    "Source",
    "SourceData",
    "SpritesSource",
    "TorchvisionSource",
]
