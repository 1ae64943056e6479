"""Image data: sources (sources.py), in-memory splits and their batches (batches.py), and the one
LightningDataModule that every model trains on (datamodule.py)."""

from autoencoders.data.batches import Batches, ImageSplit, split_position, to_unit_float
from autoencoders.data.datamodule import BINARIZE, ImageDataModule
from autoencoders.data.sources import ImageFolderSource, MNISTSubset, Source, SourceData, TorchvisionSource

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
    "TorchvisionSource",
]
