"""Datasets as uint8 tensors in memory, with seeded train/val splits."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, unknown_name
from ._common import Arrays, RawData
from .cifar import load_cifar
from .folder import load_image_folder
from .idx import load_idx_dataset
from .synthetic import SyntheticSpec, make_synthetic

log = logging.getLogger(__name__)

# Published per-channel statistics of the train sets, in [0, 1] units.
STANDARD_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TEST_FRACTION = 0.1
"""Share of an image folder without a test/ sub-folder that becomes the test split."""

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
}


@dataclass(frozen=True, eq=False)
class Split:
    """Images and labels of one split, kept as compact uint8 tensors.

    Attributes:
        images: (N, C, H, W) uint8.
        labels: (N,) int64 class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UserError(
                f"Split images must be a uint8 tensor (N, C, H, W), found {self.images.dtype} "
                f"{tuple(self.images.shape)}."
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise UserError(
                f"Split labels must be int64 (N,) with N = {len(self.images)}, found {self.labels.dtype} "
                f"{tuple(self.labels.shape)}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor | Sequence[int] | np.ndarray) -> Split:
        """The samples at `indices` (integers, in that order, or a boolean mask)."""
        idx = torch.as_tensor(indices)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
        return Split(self.images[idx], self.labels[idx])

    def subset(self, classes: Sequence[int]) -> Split:
        """The samples whose label is in `classes`; labels are not renumbered."""
        mask = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return self.select(mask.nonzero().flatten())


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset: class names, three splits and normalisation statistics."""

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        shapes = {tuple(s.images.shape[1:]) for s in (self.train, self.val, self.test) if len(s)}
        if len(shapes) > 1:
            raise UserError(f"dataset {self.name!r}: splits have different image shapes {sorted(shapes)}.")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise UserError(
                f"dataset {self.name!r}: mean/std need {self.in_channels} values each, "
                f"found {len(self.mean)}/{len(self.std)}."
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def split(self, name: str) -> Split:
        """The split called ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise unknown_name("split", name, ("train", "val", "test"))
        return getattr(self, name)


Reader = Callable[[Path | None, bool, int, SyntheticSpec | None], RawData]
_READERS: dict[str, Reader] = {
    "mnist": lambda d, dl, seed, spec: load_idx_dataset("mnist", d, dl),
    "fashion-mnist": lambda d, dl, seed, spec: load_idx_dataset("fashion-mnist", d, dl),
    "cifar10": lambda d, dl, seed, spec: load_cifar("cifar10", d, dl),
    "cifar100": lambda d, dl, seed, spec: load_cifar("cifar100", d, dl),
    "imagefolder": lambda d, dl, seed, spec: load_image_folder(d),
    "synthetic": lambda d, dl, seed, spec: make_synthetic(spec or SyntheticSpec(), seed),
}


def list_datasets() -> tuple[str, ...]:
    """Names `load_dataset` accepts."""
    return tuple(_READERS)


def canonical_name(name: str) -> str:
    """Normalise a dataset name (case, ``_`` vs ``-``, aliases); raise for unknown names."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _READERS:
        raise unknown_name("dataset", name, _READERS)
    return key


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in [0, 1] units."""
    if len(images) == 0:
        raise UserError("cannot compute mean/std of an empty split; the train split needs samples.")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):  # chunks keep float copies small
        x = images[start:start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _to_split(arrays: Arrays) -> Split:
    images, labels = arrays
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _carve(n: int, fractions: dict[str, float], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded disjoint index sets: one per entry of `fractions` (of `n`), and the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for key, fraction in fractions.items():
        count = round(fraction * n)
        out[key] = perm[start:start + count].sort().values  # sorted: keep the file order
        start += count
    return perm[start:].sort().values, out


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    train_limit: int | None = None,
    synthetic_spec: SyntheticSpec | None = None,
) -> Dataset:
    """Load a dataset into memory.

    Args:
        name: one of `list_datasets()`.
        data_dir: folder holding the files (required for ``imagefolder``).
        val_fraction: share of the train images held out as validation (seeded);
            ignored when an image folder has its own ``val/``.
        seed: seed of the validation split, of `train_limit` and of ``synthetic`` images.
        download: download missing MNIST / Fashion-MNIST / CIFAR files (MD5-checked).
        train_limit: keep only this many random train images (after the val split), for quick runs.
        synthetic_spec: sizes of the ``synthetic`` dataset.

    Raises:
        UserError: unknown name, bad argument, or corrupt files.
        DataNotFoundError: the files were not found; the message says where it looked.
    """
    key = canonical_name(name)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), found {val_fraction}.")
    if train_limit is not None and train_limit < 1:
        raise UserError(f"train_limit must be a positive number of images or None, found {train_limit}.")
    if synthetic_spec is not None and key != "synthetic":
        raise UserError(f"synthetic_spec only applies to the 'synthetic' dataset, not {key!r}; drop it.")
    root = Path(data_dir).expanduser() if data_dir is not None else None

    raw = _READERS[key](root, download, seed, synthetic_spec)
    train = _to_split(raw.train)
    fractions = {}
    if raw.test is None:
        fractions["test"] = TEST_FRACTION
    if raw.val is None:
        fractions["val"] = val_fraction
    keep, carved = _carve(len(train), fractions, seed)
    if len(keep) == 0:
        raise UserError(f"dataset {key!r} has only {len(train)} train images; nothing is left after the splits.")
    test = _to_split(raw.test) if raw.test is not None else train.select(carved["test"])
    val = _to_split(raw.val) if raw.val is not None else train.select(carved["val"])
    train = train.select(keep)
    if train_limit is not None and train_limit < len(train):
        # A different stream from the val split, so limits do not change which images are validation.
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:train_limit]
        train = train.select(pick.sort().values)

    mean, std = STANDARD_STATS.get(key) or channel_stats(train.images)
    log.info(
        "dataset %s: %d train, %d val, %d test, %d classes", key, len(train), len(val), len(test), len(raw.classes)
    )
    return Dataset(key, raw.classes, train, val, test, mean, std)
