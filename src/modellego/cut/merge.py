"""Merging components of one source model through the union of their channels.

Components cut from the same source share channels (early layers serve every class). Padding them
side by side computes each shared channel once per component; merging keeps, in every channel
space, the union of the channels the components keep, with the source's weights, so a shared
channel is computed once. The merged model is exactly the source with every channel outside that
union zeroed, restricted to the union of the tasks (tested). It is not each component side by
side: a channel kept by both reads, in the merge, the inputs that either component kept (a
component alone reads only its own), so the merge needs the source's weights for those links.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..calibration.calibrate import DEFAULT_CALIBRATION
from ..core.graph import ChannelGraph, trace
from ..core.locate import equal_groups
from ..errors import UserError
from ..io.info import ModelInfo, get_info, weights_hash
from .disassemble import example_input, extract


def _local(values: Sequence[int], kept_by_source: Sequence[int] | None, layer: str) -> list[int]:
    """Indices in the source's layer of channels a component's plan names in base-architecture terms."""
    if kept_by_source is None:
        return list(values)
    where = {v: i for i, v in enumerate(kept_by_source)}
    missing = [v for v in values if v not in where]
    if missing:
        raise UserError(f"layer {layer!r}: the component keeps channels {missing[:5]} that the source does not have")
    return [where[v] for v in values]


def _kept_spaces(graph: ChannelGraph, plan: dict, source_plan: dict | None) -> dict[int, set[int]]:
    """Kept channels per channel space of one component, read off its pruning plan."""
    kept: dict[int, set[int]] = {}
    for name, node in [(n, layer.node) for n, layer in graph.layers.items()] + list(graph.channelwise_params.items()):
        segs = graph.segments(node)
        if name not in plan or len(segs) != 1 or segs[0].spatial != 1:
            continue
        ref = source_plan[name]["out"] if source_plan else None
        kept.setdefault(segs[0].space, set()).update(_local(plan[name]["out"], ref, name))
    return kept


def merge(
    source: nn.Module,
    components: Sequence[nn.Module],
    *,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibrate: str = DEFAULT_CALIBRATION,
    verify: bool = True,
    progress: bool = False,
) -> nn.Module:
    """One component of `source` for the union of the components' tasks (in order, duplicates once).

    Args:
        source: the model every component was cut from (checked by weights hash).
        components: components of `source`.
        calibration: training batches to calibrate the merged component (as in `disassemble`).
        calibrate: calibration method when `calibration` is given.
        verify: check the merge against the masked source.
        progress: show a progress bar over the layers ``recon`` calibration refits.

    Raises:
        UserError: no components, or a component cut from another model.
    """
    if not components:
        raise UserError("nothing to merge")
    src_hash = weights_hash(source.state_dict())
    infos: list[ModelInfo] = []
    for i, c in enumerate(components):
        info = get_info(c)
        if info is None or info.kind != "component":
            raise UserError(f"input {i} is not a component; merge takes components of one source model")
        if info.provenance.get("source", {}).get("sha256") != src_hash:
            raise UserError(f"component {i} ({', '.join(info.class_names)}) was not cut from this source model "
                            "(weights hash differs); merge only components of one source, or assemble them")
        infos.append(info)
    src_info = get_info(source)
    # A source of the user's own records no input; its components record what they were cut on.
    spec = src_info.input if src_info and src_info.input else next((i.input for i in infos if i.input), None)
    if spec is None:
        raise UserError("the source model has no input description; load it from a file or set ModelInfo.input")
    shape = (spec.channels, *spec.size)
    example = example_input(source, shape)
    graph = trace(source, example)
    source_plan = src_info.pruning if src_info else None
    kept: dict[int, set[int]] = {}
    classes: list[int] = []
    for info in infos:
        for s, idx in _kept_spaces(graph, info.pruning or {}, source_plan).items():
            kept.setdefault(graph.find(s), set()).update(idx)
        classes += [c for c in info.provenance["task"] if c not in classes]
    out_space = graph.segments(graph.output)[0].space
    whole = graph.whole_spaces
    keep = {}
    for s in sorted({graph.find(s) for s in graph.space_size}):
        if s == out_space:
            keep[s] = classes
        elif s in whole:  # the input image and pinned spaces keep every channel, as in every component
            keep[s] = list(range(graph.space_size[s]))
        elif s in kept:
            keep[s] = sorted(kept[s])
        else:
            raise UserError(f"the components' pruning plans do not cover channel space {s}; were they cut from "
                            f"this architecture?")
    equal_groups(graph, keep, fixed=whole | {out_space})  # a union of equal groups need not be equal
    provenance = {"task": classes, "merged_from": [i.provenance for i in infos]}
    return extract(source, graph, example, keep, classes, provenance=provenance, calibration=calibration,
                   calibrate=calibrate, verify=verify, progress=progress)
