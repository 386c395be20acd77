"""Datasets, transforms and mini-batches for training and evaluating classifiers."""
from __future__ import annotations

from .cifar import load_pickle
from .dataset import (
    STANDARD_STATS,
    Dataset,
    Split,
    canonical_name,
    channel_stats,
    list_datasets,
    load_dataset,
)
from .idx import read_idx, write_idx
from .loader import BatchIterator, batches, num_batches
from .synthetic import SyntheticSpec
from .transforms import (
    AUGMENTATIONS,
    Compose,
    GreyToRGB,
    Normalize,
    Pad,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    augmentation,
    default_augmentation,
    preprocessing,
    to_float,
)

__all__ = [
    "AUGMENTATIONS",
    "STANDARD_STATS",
    "BatchIterator",
    "Compose",
    "Dataset",
    "GreyToRGB",
    "Normalize",
    "Pad",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "Split",
    "SyntheticSpec",
    "augmentation",
    "batches",
    "canonical_name",
    "channel_stats",
    "default_augmentation",
    "list_datasets",
    "load_dataset",
    "load_pickle",
    "num_batches",
    "preprocessing",
    "read_idx",
    "to_float",
    "write_idx",
]
