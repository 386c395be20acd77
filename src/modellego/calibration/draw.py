"""A seeded calibration draw from a stream of training batches, in one pass and bounded memory.

`modellego.disassemble(model, classes, batches=train)` profiles from `train` and calibrates from
images of the task drawn from the same batches. The batches may be a one-shot iterator (a
DataLoader over a folder too large for memory), so the draw rides along the profiling pass
(`CalibrationDraw.wrap`) instead of needing a second one.

Every sample of the task's classes gets a random key from a seeded generator; the draw keeps the
`images` samples with the smallest keys, which is a uniform random subset of the stream (the keys
are i.i.d.), and never holds more than `images` + one batch of them.

Across processes (each reading its own shard), every process draws with keys of its own seeded
stream and `reduce` keeps, over all of them, the `images` smallest keys: a uniform random draw
from all the shards, each process holding its share.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING

import torch

from ..core.distributed import gather_rows
from ..errors import UserError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Batch = tuple[torch.Tensor, torch.Tensor]


class CalibrationDraw:
    """A uniform random draw of up to `images` samples of `classes` from batches seen by `update`.

    Args:
        classes: labels of the task (in the batches' numbering); other samples are ignored.
            ``None``: every sample is a candidate.
        images: how many samples to keep at most.
        seed: seed of the keys: the same stream and seed give the same draw.
        rank: this process's rank when processes draw from their shards (see `reduce`): each
            draws its keys from another stream of the seed.
    """

    def __init__(self, classes: Sequence[int] | None, images: int = 2000, seed: int = 0, rank: int = 0) -> None:
        if images < 1:
            raise UserError(f"the calibration draw needs at least one image, got images={images}")
        self.classes = None if classes is None else torch.as_tensor([int(c) for c in classes])
        self.images = int(images)
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed + (rank << 32))  # rank 0: the one-process stream
        self._keys = torch.empty(0)
        self._order = torch.empty(0, dtype=torch.long)  # stream position, so the draw keeps stream order
        self._x: torch.Tensor | None = None
        self._y = torch.empty(0, dtype=torch.long)
        self._seen = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer one batch. Shape: x (B, ...), y (B,)."""
        if x.shape[0] != y.shape[0]:
            raise UserError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} labels")
        keys = torch.rand(len(y), generator=self._gen)  # one key per sample, task or not: same keys for any task
        order = torch.arange(self._seen, self._seen + len(y))
        self._seen += len(y)
        mine = torch.ones(len(y), dtype=torch.bool) if self.classes is None else torch.isin(y.cpu(), self.classes)
        if not mine.any():
            return
        xs = x.detach()[mine.to(x.device)].cpu()
        keys, order, ys = keys[mine], order[mine], y.cpu()[mine].long()
        if self._x is not None:
            keys, order = torch.cat([self._keys, keys]), torch.cat([self._order, order])
            xs, ys = torch.cat([self._x, xs]), torch.cat([self._y, ys])
        if len(keys) > self.images:
            pick = torch.topk(keys, self.images, largest=False).indices
            keys, order, xs, ys = keys[pick], order[pick], xs[pick], ys[pick]
        self._keys, self._order, self._x, self._y = keys, order, xs, ys

    def reduce(self, group: ProcessGroup | None) -> None:
        """Keep, over every process of `group`, the `images` samples with the smallest keys; each
        process keeps those it holds (every process must call this)."""
        everyone = gather_rows(self._keys, group)
        if len(everyone) > self.images:
            threshold = torch.kthvalue(everyone, self.images).values
            mine = self._keys <= threshold
            self._keys, self._order, self._y = self._keys[mine], self._order[mine], self._y[mine]
            self._x = self._x[mine] if self._x is not None else None

    def wrap(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """`batches` unchanged, offering each to the draw on the way through the first pass only.

        A reader that goes through the batches twice (profiling does, when its candidates
        overflow memory) must not offer them twice.
        """
        return _SizedTap(self, batches) if isinstance(batches, Sized) else _Tap(self, batches)

    def __len__(self) -> int:
        return len(self._y)

    def batches(self, batch_size: int = 256) -> list[Batch]:
        """The drawn samples in stream order, as (inputs, labels) batches.

        Raises:
            UserError: no sample of the task's classes was seen.
        """
        if self._x is None:
            which = "no training image" if self.classes is None else f"no training image of classes {self.classes.tolist()}"
            raise UserError(f"{which} in the batches ({self._seen} samples seen) to calibrate from")
        pos = torch.argsort(self._order)
        x, y = self._x[pos], self._y[pos]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


class _Tap:
    """Re-iterable view of `batches` whose first pass feeds `draw`."""

    def __init__(self, draw: CalibrationDraw, batches: Iterable[Batch]) -> None:
        self.draw, self.batches, self.passes = draw, batches, 0

    def __iter__(self) -> Iterator[Batch]:
        self.passes += 1
        for x, y in self.batches:
            if self.passes == 1:
                self.draw.update(x, y)
            yield x, y


class _SizedTap(_Tap):
    """A `_Tap` of batches that know their number (progress bars show a total)."""

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # Sized, checked by `wrap`
