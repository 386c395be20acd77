"""A seeded calibration draw from a stream of training batches, in one pass and bounded memory.

`modellego.disassemble(model, classes, batches=train)` profiles from `train` and calibrates from
images of the task drawn from the same batches. The batches may be a one-shot iterator (a
DataLoader over a folder too large for memory), so the draw rides along the profiling pass
(`CalibrationDraw.wrap`) instead of needing a second one.

Every sample gets a random key keyed by the seed and its position in the stream
(`modellego.core.keyed`); the draw keeps the `images` samples of the task's classes with the
smallest keys, which is a uniform random subset of the stream, and never holds more than `images`
+ one batch of them.

Across processes, each reads its shard: every `world`-th sample of the stream from its rank on
(`modellego.data.StreamedBatches(shard=...)`, or a `DistributedSampler` that needs no padding).
The keys of a position are the same in every process, so `reduce` keeps the one-process draw;
every process then holds all of it, in stream order, and calibrates from its share of the batches
(`modellego.core.distributed.batch_share`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, cast

import torch

from ..core.distributed import all_sum, gather, gather_rows
from ..core.keyed import keyed_uniform
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
        shard: ``(rank, world_size)`` when processes draw from their shards (see `reduce`): this
            process's samples are those at positions ``rank, rank + world_size, ...`` of the stream.
    """

    def __init__(self, classes: Sequence[int] | None, images: int = 2000, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if images < 1:
            raise UserError(f"the calibration draw needs at least one image, got images={images}")
        rank, world = shard
        if not 0 <= rank < world:
            raise UserError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.classes = None if classes is None else torch.as_tensor([int(c) for c in classes])
        self.images = int(images)
        self.seed, self.shard = seed, (rank, world)
        self._keys = torch.empty(0, dtype=torch.float64)
        self._order = torch.empty(0, dtype=torch.long)  # position in the whole stream, so the draw keeps stream order
        self._x: torch.Tensor | None = None
        self._y = torch.empty(0, dtype=torch.long)
        self._seen = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer one batch. Shape: x (B, ...), y (B,)."""
        if x.shape[0] != y.shape[0]:
            raise UserError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} labels")
        rank, world = self.shard
        order = rank + world * torch.arange(self._seen, self._seen + len(y))  # positions in the whole stream
        keys = keyed_uniform(self.seed, order)  # by position, task or not: the same keys for any task
        self._seen += len(y)
        mine = torch.ones(len(y), dtype=torch.bool) if self.classes is None else torch.isin(y.cpu(), self.classes)
        if len(self._keys) == self.images:  # full: only a smaller key gets in
            mine &= keys < self._keys.max()
        if not mine.any():
            return
        xs, keys, order, ys = x.detach()[mine.to(x.device)].cpu(), keys[mine], order[mine], y.cpu()[mine].long()
        if self._x is None:
            self._x = xs[:0]
        held = len(self._keys)
        if held + len(keys) <= self.images:  # room for all of them
            self._keep(torch.empty(0, dtype=torch.long), torch.arange(len(keys)), xs, keys, order, ys)
            return
        best = torch.topk(torch.cat([self._keys, keys]), self.images, largest=False).indices
        stays = torch.zeros(held, dtype=torch.bool)
        stays[best[best < held]] = True
        self._keep(torch.nonzero(~stays).flatten(), best[best >= held] - held, xs, keys, order, ys)

    def _keep(self, free: torch.Tensor, new: torch.Tensor, xs: torch.Tensor, keys: torch.Tensor,
              order: torch.Tensor, ys: torch.Tensor) -> None:
        """Write samples `new` of (xs, keys, order, ys) into the held slots `free`, appending the
        rest: a full draw copies only what replaces a sample, not everything it holds."""
        assert self._x is not None
        over, rest = new[:len(free)], new[len(free):]  # every free slot is refilled: the draw stays full
        for held, fresh in ((self._x, xs), (self._keys, keys), (self._order, order), (self._y, ys)):
            held[free] = fresh[over]
        self._x, self._keys = torch.cat([self._x, xs[rest]]), torch.cat([self._keys, keys[rest]])
        self._order, self._y = torch.cat([self._order, order[rest]]), torch.cat([self._y, ys[rest]])

    def reduce(self, group: ProcessGroup | None) -> None:
        """Keep, over every process of `group`, the `images` samples with the smallest keys, and give
        every process all of them (every process must call this): each then holds the draw one
        process would make from the whole stream."""
        if group is None:
            return
        keys, order = gather_rows(self._keys, group), gather_rows(self._order, group)
        best = torch.topk(keys, min(self.images, len(keys)), largest=False).indices
        mine = torch.isin(self._order, order[best])
        shapes = [s for s in gather(None if self._x is None else (tuple(self._x.shape[1:]), str(self._x.dtype)), group) if s]
        self._seen = int(all_sum([torch.tensor([self._seen])], group)[0])
        if not shapes:  # no process saw a sample of the task: `batches` says so
            return
        shape, dtype = cast(tuple[tuple[int, ...], str], shapes[0])
        x = self._x[mine] if self._x is not None else torch.empty((0, *shape), dtype=getattr(torch, dtype.split(".")[-1]))
        self._x, self._y = gather_rows(x, group), gather_rows(self._y[mine], group)
        self._keys, self._order = gather_rows(self._keys[mine], group), gather_rows(self._order[mine], group)

    def wrap(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """`batches` unchanged, offering each to the draw on the way through the first pass only.

        A reader that goes through the batches twice (profiling does, when its candidates
        overflow memory) must not offer them twice.
        """
        return _SizedTap(self, batches) if isinstance(batches, Sized) else _Tap(self, batches)

    def __len__(self) -> int:
        return len(self._y)

    @property
    def seen(self) -> int:
        """Samples offered so far (of every process, after `reduce`)."""
        return self._seen

    def batches(self, batch_size: int = 256) -> list[Batch]:
        """The drawn samples in stream order, as (inputs, labels) batches.

        Raises:
            UserError: no sample of the task's classes was seen.
        """
        if self._x is None or not len(self._y):
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
