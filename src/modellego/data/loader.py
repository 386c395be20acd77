"""Mini-batches straight from in-memory uint8 tensors (no DataLoader, no workers)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import UserError
from .dataset import Split
from .transforms import to_float

Transform = Callable[..., torch.Tensor]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `n` samples make."""
    return n // batch_size if drop_last else -(-n // batch_size)


class BatchIterator:
    """Re-iterable batches of (float images after `transform`, int64 labels).

    Each pass over the iterator is one epoch. With ``shuffle`` the order (and the
    random draws of `transform`) of epoch ``e`` depend only on ``(seed, e)``, so
    runs repeat exactly; `set_epoch` picks the epoch explicitly.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        transform: Transform | None = None,
        shuffle: bool = False,
        seed: int = 0,
        classes: Sequence[int] | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, found {batch_size}.")
        self.split = split.subset(classes) if classes is not None else split
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def __len__(self) -> int:
        return num_batches(len(self.split), self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the shuffle and augmentation of `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Mix seed and epoch into one 63-bit seed; different epochs get different orders.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (1 << 63))
        self.epoch += 1
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        images, labels = self.split.images, self.split.labels
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = images[idx], labels[idx]
            if self.device is not None:  # move uint8, a quarter of the float bytes
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = to_float(x)
            if self.transform is not None:
                x = self.transform(x, generator=g)
            yield x, y


def batches(
    split: Split,
    batch_size: int,
    *,
    transform: Transform | None = None,
    shuffle: bool = False,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> BatchIterator:
    """Batches of (float images in [0, 1] after `transform`, int64 labels) from `split`.

    Args:
        split: the samples.
        batch_size: samples per batch (the last one may be smaller unless `drop_last`).
        transform: called as ``transform(x, generator=g)`` on each float batch.
        shuffle: random order per epoch, seeded by `seed`.
        seed: seed of the order and of the transform's random draws.
        classes: keep only samples with these labels (labels are not renumbered).
        drop_last: drop a final incomplete batch.
        device: where the batches go; None leaves them on the CPU.
    """
    return BatchIterator(
        split, batch_size, transform=transform, shuffle=shuffle, seed=seed,
        classes=classes, drop_last=drop_last, device=device,
    )
