"""Component locating under a FLOPs budget (beyond the paper).

With the paper's thresholds the component's size is whatever α and β give. On the width-scaled
networks here that is 80-99% of the source's FLOPs, because the early high-resolution layers serve
every class. A budget turns the question around. Every layer keeps the same share f of its inputs,
ranked by relevance to the task's classes together (`modellego.core.locate.relevant_inputs`: their
Eq. 6 counts add up), and f is the largest share whose component fits the budget. It is found by
bisection: FLOPs grow with f. A uniform share avoids the narrow bottleneck layers that raising β
everywhere creates (BENCHMARKS.md, threshold sweep).

Needs a profile that kept its relative contributions (``profile(..., keep_contributions=True)``):
each trial re-locates from them, without profiling again.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.graph import ChannelGraph
from ..core.layers import kept_groups
from ..core.locate import Thresholds, keep_channels, locate_class
from ..core.profiling import Profile
from ..errors import UserError
from ..hooks import forward_hooks
from ..io.plan import Plan
from .prune import build_plan, full_plan

log = logging.getLogger(__name__)


def output_positions(model: nn.Module, graph: ChannelGraph, example: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of every Conv2d/Linear layer (H·W for a convolution, 1 for a Linear on vectors)."""
    positions: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            dims = out.shape[2:] if isinstance(module, nn.Conv2d) else out.shape[1:-1]
            positions[name] = math.prod(dims)
        return hook

    with forward_hooks(model, {n: hook_for(n) for n in graph.layers}), torch.no_grad():
        model(example[:1])
    return positions


def plan_flops(model: nn.Module, plan: Plan, positions: Mapping[str, int]) -> int:
    """FLOPs of one sample through the Conv2d and Linear layers a plan keeps (multiply-add = 2).

    Counts what `torch.utils.flop_counter` counts for these layers, without building the component.
    """
    modules = dict(model.named_modules())
    total = 0
    for name, pos in positions.items():
        m, dims = modules[name], plan[name]
        n_out, n_in = len(dims["out"]), len(dims["in"])
        if isinstance(m, nn.Conv2d):  # a filter reads the kept inputs of its own group
            groups = kept_groups(m, torch.as_tensor(list(dims["in"]), dtype=torch.long))
            per_filter = n_in // groups * math.prod(m.kernel_size)
        else:
            per_filter = n_in
        total += 2 * pos * n_out * per_filter
    return total


@dataclass(frozen=True)
class Budgeted:
    """The channels kept under a budget, with how they were chosen."""

    keep: dict[int, list[int]]
    keep_fraction: float
    flops_ratio: float
    rank: str = "task"
    shares: dict[str, float] | None = None  # per layer, after the fill (None: `keep_fraction` everywhere)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"keep_fraction": round(self.keep_fraction, 6),
                                  "flops_ratio": round(self.flops_ratio, 6), "rank": self.rank}
        if self.shares is not None:
            out["shares"] = {k: round(v, 6) for k, v in self.shares.items()}
        return out


# How a task's classes share a layer's budget: "task" ranks the inputs by the classes' summed
# Eq. 6 counts and keeps one share f for the whole task; "class" keeps a share f per class and
# their union (every class keeps its own best inputs; the union is larger and uneven, so f is
# smaller for the same FLOPs).
RANKS = ("task", "class")


def locate_union(graph: ChannelGraph, stacked: Mapping[str, torch.Tensor], classes: Sequence[int],
                 thresholds: Thresholds, keep_fraction: float) -> dict[str, torch.Tensor]:
    """Rank "class": each class keeps its own share of every layer's inputs; the task keeps their union.

    Shape: `stacked` holds (C, Q, P // groups) per layer, one row per class of `classes`; returns (P,) bool
    per layer.
    """
    union: dict[str, torch.Tensor] = {}
    for row, c in enumerate(classes):
        got, _ = locate_class(graph, {k: v[row] for k, v in stacked.items()}, c, thresholds,
                              keep_fraction=keep_fraction)
        union = {k: union[k] | v if k in union else v for k, v in got.items()}
    return union


def locate_budget(
    model: nn.Module,
    graph: ChannelGraph,
    example: torch.Tensor,
    profile: Profile,
    classes: Sequence[int],
    flops: float,
    *,
    rank: str = "task",
    steps: int = 16,
    fill: bool = True,
) -> Budgeted:
    """The most relevant channels of `classes` that fit `flops` × the source model's FLOPs.

    Args:
        model: the profiled model.
        graph: its traced graph.
        example: an example input batch.
        profile: a profile of `model` with contributions kept.
        classes: the task (output indices).
        flops: the budget, a fraction of the source's FLOPs in (0, 1].
        rank: ``"task"`` (one share for the task's classes together) or ``"class"`` (a share per
            class, then their union); see `RANKS`.
        steps: bisection steps on the kept share.
        fill: after the uniform share, raise each layer's own share in turn (from the output
            back to the input) as far as the budget allows, so that the FLOPs land close to the
            budget even where one more channel of a narrow layer is a large step (rank
            ``"task"`` only).

    Raises:
        UserError: no contributions in the profile, a budget outside (0, 1], or one that even
            the smallest component exceeds.
    """
    if not 0.0 < flops <= 1.0:
        raise UserError(f"the FLOPs budget must be a fraction in (0, 1], got {flops}")
    if rank not in RANKS:
        raise UserError(f"unknown budget rank {rank!r}; expected one of {', '.join(RANKS)}")
    if profile.contributions is None:
        raise UserError("locating under a FLOPs budget needs a profile that kept its contributions; "
                        "profile with keep_contributions=True (CLI: modellego profile --keep-contributions)")
    rows = profile.rows(classes)
    stacked = {k: v[rows] for k, v in profile.contributions.items()}  # (C, Q, P) per layer
    positions = output_positions(model, graph, example)
    full = plan_flops(model, full_plan(graph), positions)

    def trial(f: float, warn: bool = False, shares: dict[str, float] | None = None) -> Budgeted:
        if rank == "task":
            ins, _ = locate_class(graph, stacked, list(classes), profile.thresholds, keep_fraction=shares or f)
        else:
            ins = locate_union(graph, stacked, classes, profile.thresholds, f)
        keep = keep_channels(graph, ins, classes, warn=warn)  # trials stay quiet; the choice warns
        return Budgeted(keep, f, plan_flops(model, build_plan(graph, keep), positions) / full, rank, shares)

    if trial(1.0).flops_ratio <= flops:
        return trial(1.0, warn=True)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = trial(mid)
        if got.flops_ratio <= flops:
            lo, best = mid, got
        else:
            hi = mid
    if best is None:
        smallest = trial(hi).flops_ratio
        raise UserError(f"no component of classes {list(classes)} fits {flops:.1%} of the FLOPs; the smallest "
                        f"found keeps {smallest:.1%}")
    log.info("FLOPs budget %.1f%%: every layer keeps %.1f%% of its inputs, %.1f%% of the FLOPs",
             100 * flops, 100 * best.keep_fraction, 100 * best.flops_ratio)
    if fill and rank == "task":
        shares = _fill(graph, best.keep_fraction, flops, lambda sh: trial(best.keep_fraction, shares=sh))
        return trial(best.keep_fraction, warn=True, shares=shares)
    return trial(best.keep_fraction, warn=True)


def _fill(graph: ChannelGraph, share: float, flops: float, trial, steps: int = 6) -> dict[str, float] | None:
    """Per-layer shares from `share` up: each layer in turn, output first, as large as the budget allows.

    The output side goes first because its layers read small feature maps, so a channel there
    costs few FLOPs. Returns None when no layer could be raised.
    """
    shares = {name: share for name in graph.layers}
    raised = False
    for name in reversed(list(graph.layers)):
        lo, hi = shares[name], 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            if trial({**shares, name: mid}).flops_ratio <= flops:
                lo = mid
            else:
                hi = mid
        if trial({**shares, name: hi}).flops_ratio <= flops:  # the bisection never tries 1.0 itself
            lo = hi
        raised |= lo > shares[name]
        shares[name] = lo
    return shares if raised else None
