"""Structured pruning: physically remove channels, described as plain data.

A *plan* maps layer names to the indices they keep: ``{"features.0": {"out": [...], "in": [...]}}``.
It is what component files store; `prune_layers` replays it on a freshly built architecture.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ..core.graph import ChannelGraph, Layout
from ..core.layers import layer_type
from ..errors import UserError
from ..io.plan import Plan


def kept_features(layout: Layout, keep: Mapping[int, Sequence[int]]) -> list[int]:
    """Indices along a tensor's feature axis that survive, given the kept channels of each space."""
    out: list[int] = []
    offset = 0
    for seg in layout:
        for c in keep[seg.space]:
            start = offset + c * seg.spatial
            out.extend(range(start, start + seg.spatial))
        offset += seg.features
    return out


def build_plan(graph: ChannelGraph, keep: Mapping[int, Sequence[int]]) -> Plan:
    """The pruning plan for every Conv2d, Linear and channel-wise layer with parameters.

    Args:
        graph: the traced model.
        keep: kept channel indices per (representative) channel space; every space must appear.
    """
    plan: Plan = {}
    for name, layer in graph.layers.items():
        plan[name] = {
            "out": kept_features(graph.segments(layer.node), keep),
            "in": kept_features(graph.segments(layer.input), keep),
        }
    for name, node in graph.channelwise_params.items():
        plan[name] = {"out": kept_features(graph.segments(node), keep)}
    return plan


def full_plan(graph: ChannelGraph) -> Plan:
    """The plan that keeps every channel: the source model itself."""
    return build_plan(graph, {s: range(n) for s, n in graph.space_size.items()})


def _as_index(values: Sequence[int] | None, size: int, what: str) -> torch.Tensor:
    if values is None:
        return torch.arange(size)
    idx = torch.as_tensor(list(values), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= size):
        raise UserError(f"{what}: kept index out of range [0, {size})")
    return idx


def prune_layers(model: nn.Module, plan: Mapping[str, Mapping[str, Sequence[int]]]) -> nn.Module:
    """Replace each layer named in `plan` by a copy keeping only the listed channels (in place).

    Returns the model. Layers not in the plan are untouched. How each type is cut is its entry in
    `modellego.core.layers.LAYER_TYPES`.
    """
    modules = dict(model.named_modules())
    for name, keep in plan.items():
        if name not in modules:
            raise UserError(f"pruning plan names layer {name!r}, which the model does not have")
        m = modules[name]
        lt = layer_type(m)
        if lt is None:
            raise UserError(f"cannot prune layer {name!r} of type {type(m).__name__}")
        n_out, n_in = lt.sizes(m)
        in_idx = None if n_in is None else _as_index(keep.get("in"), n_in, name)
        model.set_submodule(name, lt.cut(m, _as_index(keep.get("out"), n_out, name), in_idx, name))
    return model


def fresh_like(m: nn.Module, out_n: int, in_n: int | None = None) -> nn.Module:
    """A zero-initialised copy of layer `m` (its own class and attributes) with `out_n` outputs and `in_n` inputs."""
    lt = layer_type(m)
    if lt is None:
        raise UserError(f"cannot resize a layer of type {type(m).__name__}")
    return lt.resized(m, out_n, in_n)


def resize_layers(model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Replace each named layer by a zero-initialised one of the given sizes (in place)."""
    modules = dict(model.named_modules())
    for name, size in sizes.items():
        if name not in modules:
            raise UserError(f"layer sizes name layer {name!r}, which the model does not have")
        model.set_submodule(name, fresh_like(modules[name], int(size["out"]), size.get("in")))
    return model
