"""Component locating (Eqs. 6-10): walk relevance back from one class's logit over the traced graph.

Rules (the paper leaves the graph to the implementer):
- a tensor read by several nodes is relevant where ANY reader needs it (relevance is OR-ed);
- an add passes its relevance to both addends; a concatenation splits it by channel offsets;
- BatchNorm, activations, pooling and dropout pass it through channel by channel;
- a flatten maps C×H×W features back to channels (a channel is relevant if any position is);
- a channel slice or a piece of a split maps back by its offset;
- a depthwise convolution couples each input channel to its output channel; a grouped one counts
  each input's votes (Eq. 6) over the outputs of its own group only;
- Conv2d and Linear apply Eqs. 9, 6, 8 and 10 with their own α and β.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import UserError
from .graph import ChannelGraph, Layer, channel_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """α (Eq. 9) and β (Eq. 10) per layer type; the paper's defaults."""

    conv_alpha: float = 0.3
    conv_beta: float = 0.2
    linear_alpha: float = 0.4
    linear_beta: float = 0.3

    def __post_init__(self) -> None:
        for name, v in self.to_json().items():
            if not 0.0 < v <= 1.0:
                raise UserError(f"threshold {name} must be in (0, 1], got {v}")

    def for_layer(self, layer: Layer) -> tuple[float, float]:
        if layer.kind == "conv":
            return self.conv_alpha, self.conv_beta
        return self.linear_alpha, self.linear_beta

    def to_json(self) -> dict[str, float]:
        return {"conv_alpha": self.conv_alpha, "conv_beta": self.conv_beta,
                "linear_alpha": self.linear_alpha, "linear_beta": self.linear_beta}


def minmax(s: torch.Tensor) -> torch.Tensor:
    """Eq. 8: min-max normalisation of a vector; a constant positive vector maps to all ones."""
    return minmax_rows(s[None])[0]


def minmax_rows(s: torch.Tensor) -> torch.Tensor:
    """`minmax` of every row of s (a constant positive row maps to ones), Shape (B, P) -> (B, P) float64."""
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    span = (hi - lo).to(torch.float64)
    flat = span <= 0
    out = (s - lo).to(torch.float64) / torch.where(flat, 1.0, span)
    return torch.where(flat, (s > 0).to(torch.float64), out)


def group_sum(per_output: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum over each input's readers: the outputs of its group. Shape: (..., Q, P // groups) -> (..., P).

    Output q of a convolution with g groups reads the inputs of group q // (Q / g), so a (Q, P/g)
    table of votes sums over the Q/g outputs of each group, and the groups lie side by side.
    """
    return per_output.unflatten(-2, (groups, -1)).sum(-2).flatten(-2)  # (..., g, Q/g, P/g) -> (..., P)


def relevant_inputs(
    layer: Layer,
    r: torch.Tensor,
    out_mask: torch.Tensor,
    th: Thresholds,
    keep_fraction: float | None = None,
) -> torch.Tensor:
    """The input channels (features) of `layer` that matter to its relevant outputs.

    Args:
        layer: a Conv2d or Linear layer.
        r: relative contributions, Shape: (Q, P // groups), or (C, Q, P // groups) for several
            classes located together (their Eq. 6 counts add up).
        out_mask: relevant outputs, Shape: (Q,) bool.
        th: thresholds.
        keep_fraction: ``None`` applies the paper's β (Eq. 10). A fraction f in (0, 1] instead
            keeps the ceil(f·P) inputs that most relevant outputs rely on (Eq. 6 count, ties broken
            by the summed relative contribution), so every layer keeps the same share: the rule
            `modellego.cut.budget` tunes to a FLOPs budget.

    Returns: Shape (P,) bool.
    """
    if layer.depthwise:
        return out_mask.clone()
    alpha, beta = th.for_layer(layer)
    r = r if r.dim() == 3 else r[None]  # (C, Q, P)
    gate = out_mask[None, :, None]  # (1, Q, 1)
    r_hat = (r >= alpha) & gate  # (C, Q, P // groups)  Eq. 9 with Appendix C's output gating
    s = group_sum(r_hat.sum(0), layer.groups)  # (P,)  Eq. 6
    if keep_fraction is None:
        return minmax(s) >= beta  # Eqs. 8, 10
    # The tie-break term is below 1 (r <= 1), so it only orders inputs of equal count.
    ties = group_sum((r.double() * gate).sum(0), layer.groups)  # (P,)
    score = s.double() + ties / (r.shape[0] * (int(out_mask.sum()) + 1))  # (P,)
    k = math.ceil(keep_fraction * len(score))
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    keep = torch.zeros(len(score), dtype=torch.bool)
    keep[order] = True
    return keep & (score > 0)


def _or(rel: dict[fx.Node, torch.Tensor], node: fx.Node, mask: torch.Tensor) -> None:
    rel[node] = rel[node] | mask if node in rel else mask.clone()


LayerRule = Callable[[Layer, torch.Tensor], torch.Tensor]


def walk(graph: ChannelGraph, start: torch.Tensor, rule: LayerRule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Carry relevance from the output back over the graph; `rule` maps a layer's relevant outputs to inputs.

    Masks may carry leading axes (one route per row): every step below acts on the last axis.

    Args:
        graph: the traced model.
        start: relevant logits, Shape: (..., num_classes) bool.
        rule: ``rule(layer, out_mask) -> in_mask``, Shapes (..., Q) -> (..., P).

    Returns: (in_masks, out_masks) keyed by layer name, Shapes (..., P) and (..., Q).
    """
    lead = start.shape[:-1]
    rel: dict[fx.Node, torch.Tensor] = {graph.output: start}
    in_masks: dict[str, torch.Tensor] = {}
    out_masks: dict[str, torch.Tensor] = {}
    for node in reversed(list(graph.gm.graph.nodes)):
        role = graph.roles.get(node)
        if role is None or role == "input":
            continue
        n_feat = sum(s.features for s in graph.layouts[node])
        mask = rel.get(node, torch.zeros(*lead, n_feat, dtype=torch.bool))
        inputs = channel_inputs(node)
        if role == "layer":
            layer = graph.layers[node.target]
            in_mask = rule(layer, mask)
            out_masks[layer.name], in_masks[layer.name] = mask, in_mask
            _or(rel, layer.input, in_mask)
        elif role in ("pass", "add", "mul"):
            for src in inputs:
                _or(rel, src, mask)
        elif role == "cat":
            offset = 0
            for src in inputs:
                n = sum(s.features for s in graph.layouts[src])
                _or(rel, src, mask[..., offset: offset + n])
                offset += n
        elif role == "slice":  # channel j is channel index[j] of the source (a slice, a split, a shuffle)
            src, index = graph.slices[node]
            full = torch.zeros(*lead, sum(s.features for s in graph.layouts[src]), dtype=torch.bool)
            full[..., index] = mask
            _or(rel, src, full)
        elif role == "flatten":
            spatial = graph.layouts[node][0].spatial
            _or(rel, inputs[0], mask.unflatten(-1, (-1, spatial)).any(-1))  # (..., C*HW) -> (..., C)
        else:  # pragma: no cover - roles are closed
            raise AssertionError(role)
    return in_masks, out_masks


def locate_class(
    graph: ChannelGraph,
    contributions: Mapping[str, torch.Tensor],
    cls: int | Sequence[int],
    thresholds: Thresholds,
    keep_fraction: float | Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Relevant inputs and outputs of every layer for class `cls`.

    The paper locates each class on its own and a task keeps the union of its classes' masks.
    Under a budget (`keep_fraction`) the task's classes walk together instead: `cls` lists them,
    `contributions` stacks theirs, and each layer keeps one share of its inputs for the whole
    task, not a share per class whose union could be several times larger.

    Args:
        graph: the traced model.
        contributions: relative contribution r per layer name, Shape: (Q, P // groups), or
            (C, Q, P // groups) when `cls` lists C classes.
        cls: output index of the class, or the indices of the classes walked together.
        thresholds: α and β.
        keep_fraction: ``None`` for the paper's β rule, else the share of inputs every layer
            keeps (see `relevant_inputs`), one for all or one per layer name.

    Returns: (in_masks, out_masks) keyed by layer name, bool tensors of Shape (P,) and (Q,).
    """
    start = torch.zeros(graph.num_classes, dtype=torch.bool)
    start[torch.as_tensor(cls, dtype=torch.long)] = True

    def share(name: str) -> float | None:
        return keep_fraction[name] if isinstance(keep_fraction, Mapping) else keep_fraction

    return walk(graph, start, lambda layer, mask: relevant_inputs(
        layer, contributions[layer.name].cpu(), mask, thresholds, share(layer.name)))


Votes = Callable[[torch.Tensor], torch.Tensor]


def locate_rows(
    graph: ChannelGraph,
    votes: Mapping[str, Votes],
    classes: torch.Tensor,
    thresholds: Thresholds,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The paper's walk for many routes at once, each from its own contributions and class.

    Row b is exactly `locate_class` of class ``classes[b]`` with row b's contributions: the
    layers' Eq. 6 counts come from `votes`, so a caller may compute them however is cheapest.

    Args:
        graph: the traced model.
        votes: per layer, ``votes(out_mask) -> s``: for each row, how many relevant outputs q
            have r[q, p] >= α (Eqs. 9 and 6), Shapes (B, Q) bool -> (B, P).
        classes: the output index each row starts from, Shape (B,).
        thresholds: β per layer type.

    Returns: (in_masks, out_masks) keyed by layer name, Shapes (B, P) and (B, Q).
    """
    start = torch.zeros(len(classes), graph.num_classes, dtype=torch.bool)
    start[torch.arange(len(classes)), classes.cpu()] = True

    def rule(layer: Layer, out_mask: torch.Tensor) -> torch.Tensor:
        if layer.depthwise:
            return out_mask.clone()
        return minmax_rows(votes[layer.name](out_mask).cpu()) >= thresholds.for_layer(layer)[1]  # Eqs. 8, 10

    return walk(graph, start, rule)


def keep_channels(
    graph: ChannelGraph,
    in_masks: Mapping[str, torch.Tensor],
    classes: Sequence[int],
    *,
    warn: bool = True,
) -> dict[int, list[int]]:
    """Kept channels per channel space for a task: the union of what any layer reads.

    Spaces merged by a residual add keep the union of all their readers' needs. The input image
    keeps every channel; the logits keep `classes` in the given order. A space nobody reads keeps
    one channel (a zero-width layer is not a valid module), with a warning unless `warn` is off.
    """
    reps = sorted({graph.find(s) for s in graph.space_size})
    masks = {s: torch.zeros(graph.space_size[s], dtype=torch.bool) for s in reps}
    for name, layer in graph.layers.items():
        feat = in_masks[name]
        offset = 0
        for seg in graph.segments(layer.input):
            part = feat[offset: offset + seg.features].view(seg.channels, seg.spatial).any(1)
            masks[seg.space] |= part
            offset += seg.features
    keep: dict[int, list[int]] = {}
    whole = graph.whole_spaces
    out_segments = graph.segments(graph.output)
    if len(out_segments) != 1 or out_segments[0].spatial != 1:
        raise UserError("the model output must be produced by one Linear or Conv layer")
    out_space = out_segments[0].space
    if out_space in whole:
        raise UserError("the model slices or splits its logits (or the layer that produces them), so a cut "
                        "cannot keep only the task's classes; return the logits of one layer instead")
    depthwise_spaces = {graph.find(seg.space) for layer in graph.layers.values() if layer.depthwise
                        for seg in graph.layouts[layer.node]}
    for s in reps:
        if s in whole:  # the image's channels, and spaces whose counts the model's code fixes
            keep[s] = list(range(graph.space_size[s]))
        elif s == out_space:
            keep[s] = [int(c) for c in classes]
        else:
            idx = torch.nonzero(masks[s]).flatten().tolist()
            if not idx:
                if warn:
                    log.warning("no class uses channel space %d (%d channels); keeping one channel", s,
                                graph.space_size[s])
                idx = [0]
            if s in depthwise_spaces and len(idx) < 2 <= graph.space_size[s]:
                idx = sorted(set(idx) | {next(c for c in range(graph.space_size[s]) if c not in idx)})
            keep[s] = idx
    equal_groups(graph, keep, fixed=whole | {out_space})
    return keep


def equal_groups(graph: ChannelGraph, keep: dict[int, list[int]], fixed: set[int]) -> None:
    """Make every grouped convolution's kept channels prunable, adding channels (in place).

    A convolution with g groups stays one convolution only if every group it keeps holds the same
    number of inputs and the same number of outputs. A group that keeps nothing on either side is
    dropped (the cut has fewer groups, as a depthwise layer drops channels); at least two groups
    stay, so the cut remains grouped. The others are topped up to the largest count, lowest index
    first. Spaces shared by several grouped layers are revisited until no layer adds a channel.
    """
    grouped = [ly for ly in graph.layers.values() if ly.grouped]
    changed = bool(grouped)
    while changed:
        changed = False
        for layer in grouped:
            spaces = [graph.segments(layer.input)[0].space, graph.segments(layer.node)[0].space]
            g = layer.groups
            sides = [[[c for c in keep[s] if c // (graph.space_size[s] // g) == k] for k in range(g)] for s in spaces]
            active = [k for k in range(g) if sides[0][k] or sides[1][k]]
            active += [k for k in range(g) if k not in active][:max(0, 2 - len(active))]
            for s, side in zip(spaces, sides):
                size, want = graph.space_size[s] // g, max(1, *(len(side[k]) for k in active))
                grown = {*keep[s]}
                for k in active:
                    grown.update([c for c in range(k * size, (k + 1) * size) if c not in grown][:want - len(side[k])])
                if len(grown) > len(keep[s]):
                    if s in fixed:
                        raise UserError(f"grouped convolution {layer.name!r}: its groups would need more channels "
                                        "than the task keeps at the model's input or output")
                    keep[s], changed = sorted(grown), True
