"""Profiling and calibration across processes with torch.distributed (e.g. under torchrun).

`modellego.profile(..., group=...)` runs in every process of a process group. Each process reads
its own batches; the collectives here make the result the profile of all the shards together:

- Sample selection ranks every class's candidates across the processes, so the samples selected
  are the ones a single process would select from all the data (ties go to the lower rank). Each
  process keeps its own share of them; no image crosses processes.
- Contribution sums are a plain additive state: one all-reduce per accumulator makes every process
  hold the sums over all selected samples, so every process locates the same masks.

Calibration (`modellego.calibration`) and assembly scaling take, in each process, a consecutive
run of whole batches of the same calibration images (`batch_share`); their sums are all-reduced and
their fits read every process's rows, so every process computes the one-process result up to the
order of floating-point sums.

Every process must make the same calls in the same order: anything that could differ between
processes (the number of outputs, the classes chunked at once) is agreed on first.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from ..errors import UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .contribution import LayerAccumulator

# Shape and dtype name of every (layer, key) sum of the accumulators.
_Specs = dict[tuple[str, str], tuple[tuple[int, ...], str]]


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in `group`; (0, 1) without one."""
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise UserError("a process group was given, but torch.distributed is not initialised; call "
                        "torch.distributed.init_process_group first (torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def _device(group: dist.ProcessGroup) -> torch.device:
    """Where this backend's collectives take their tensors: NCCL needs the process's GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather(value: object, group: dist.ProcessGroup) -> list[object]:
    """Every process's `value`, in rank order (small, plain values: they are pickled between the
    group's own processes)."""
    values: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def agree(values: Mapping[str, object], group: dist.ProcessGroup) -> None:
    """Refuse, on every process at once, named values that are not the same on every process."""
    everyone = cast(list[dict[str, object]], gather(dict(values), group))  # every process sends a dict
    differ = [k for k in values if any(v[k] != everyone[0][k] for v in everyone)]
    if differ:
        raise UserError("the processes disagree on " + "; ".join(
            f"{k} ({', '.join(_short(v[k]) for v in everyone)}, in rank order)" for k in differ))


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def agree_shards(shape: object, group: dist.ProcessGroup, what: str) -> None:
    """Refuse, on every process at once, a process without batches (`shape` None) or whose
    batches differ in `shape` from the others'."""
    shapes = gather(shape, group)
    idle = [r for r, v in enumerate(shapes) if v is None]
    if idle:
        raise UserError(f"processes {idle} got no batches: give every process a shard of the data")
    if any(v != shapes[0] for v in shapes):
        raise UserError(f"the processes disagree on {what}: {shapes} (in rank order)")


def sum_counts(counts: Sequence[Mapping[int, int]], classes: Sequence[int],
               group: dist.ProcessGroup) -> list[dict[int, int]]:
    """Per-class counts summed over the processes, for each mapping of `counts`."""
    t = torch.tensor([[m.get(c, 0) for c in classes] for m in counts], dtype=torch.int64, device=_device(group))
    dist.all_reduce(t, group=group)  # (len(counts), C)
    return [dict(zip(classes, row)) for row in t.tolist()]


def global_top(scores: Sequence[torch.Tensor], want: Sequence[int], depth: int,
               group: dist.ProcessGroup) -> list[torch.Tensor]:
    """This process's share of each class's `want[i]` best scores over all processes.

    Args:
        scores: per class, this process's candidate scores, sorted in descending order, at most
            `depth` of them (the same `depth` on every process).
        want: per class, how many to keep over all processes (at most `depth`).

    Returns: per class, the positions in `scores[i]` that are kept here.
    """
    rank, size = world(group)
    device = _device(group)
    padded = torch.full((len(scores), depth), -torch.inf, dtype=torch.float64, device=device)  # (C, M)
    for i, s in enumerate(scores):
        padded[i, : len(s)] = s.to(device, torch.float64)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    every = torch.stack(gathered, 1).flatten(1).cpu()  # (C, W*M): rank-major, each rank's list in order
    # A stable sort keeps rank-major order among equal scores: ties go to the lower rank.
    order = torch.sort(every, dim=1, descending=True, stable=True).indices  # (C, W*M)
    kept = []
    for i, n in enumerate(want):
        top = order[i, :n]
        mine = top[(top // depth) == rank] % depth
        kept.append(mine.sort().values)
    return kept


def sum_accumulators(accs: Mapping[str, LayerAccumulator], group: dist.ProcessGroup) -> None:
    """All-reduce every layer's per-class sums in place, so each process holds the sums of all.

    An accumulator creates its tensors when it first sees a sample, so a process whose shard had
    none of the classes at hand lacks some: their shapes are agreed on first and zeros stand in.
    """
    present: _Specs = {(name, key): (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                       for name, acc in accs.items() for key, t in acc.state.items()}
    union: _Specs = {}
    for other in cast(list[_Specs], gather(present, group)):  # every process sends its `present`
        for k, spec in other.items():
            if union.setdefault(k, spec) != spec:
                raise UserError(f"the processes' sums of {k[0]}/{k[1]} differ in shape or dtype: {union[k]} and {spec}")
    device = _device(group)
    for name, key in sorted(union):  # the same order on every process
        acc = accs[name]
        shape, dtype = union[name, key]
        if key not in acc.state:
            weight = acc.module.weight
            assert isinstance(weight, torch.Tensor)  # a Conv2d or Linear layer's
            acc.state[key] = torch.zeros(shape, dtype=getattr(torch, dtype), device=weight.device)
        t = acc.state[key]
        moved = t.to(device)
        dist.all_reduce(moved, group=group)
        if moved is not t:
            t.copy_(moved)


def all_sum(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Each tensor summed over the processes of `group` (the tensors themselves without one)."""
    if group is None:
        return list(tensors)
    device = _device(group)
    out = []
    for t in tensors:  # the same order on every process
        moved = t.to(device, copy=True)
        dist.all_reduce(moved, group=group)
        out.append(moved.to(t.device))
    return out


def gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every process's rows of `t`, concatenated in rank order; the processes may hold different
    numbers of rows but must agree on the rest of the shape and the dtype.

    Shape: (N_r, ...) on rank r -> (sum of N_r, ...).
    """
    if group is None:
        return t
    size = world(group)[1]
    device = _device(group)
    rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(counts, rows, group=group)
    n = [int(c) for c in counts]
    padded = torch.zeros((max(n), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)  # equal shapes: the rows padded to the longest
    return torch.cat([p[:k] for p, k in zip(parts, n)]).to(t.device)


def first_index(count: int, group: dist.ProcessGroup | None) -> int:
    """Where this process's `count` items start among every process's items in rank order."""
    if group is None:
        return 0
    rank = world(group)[0]
    return sum(cast(int, c) for c in gather(int(count), group)[:rank])


def batch_share(batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                group: dist.ProcessGroup | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of (inputs, labels) batches that every process holds alike: a
    consecutive run of them, process 0 the first, so every image is in one share and keeps its
    position (as `modellego.calibration.reconstruct` samples by position).

    The runs are of whole batches, which also keeps per-batch statistics (BatchNorm re-estimation
    equals one process's); with fewer batches than processes, of images split evenly.
    """
    rank, size = world(group)
    if size == 1:
        return list(batches)
    if len(batches) >= size:
        return list(batches[rank * len(batches) // size:(rank + 1) * len(batches) // size])
    log.info("%d batches for %d processes: each takes a run of images; BatchNorm re-estimation then sees "
             "smaller batches than one process would", len(batches), size)
    total = sum(len(y) for _, y in batches)
    lo, hi, start, mine = rank * total // size, (rank + 1) * total // size, 0, []
    for x, y in batches:
        a, b = max(lo - start, 0), min(hi - start, len(y))
        if a < b:
            mine.append((x[a:b], y[a:b]))
        start += len(y)
    return mine
