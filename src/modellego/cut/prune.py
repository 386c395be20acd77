"""Structured pruning: physically remove channels, described as plain data.

A *plan* maps layer names to the indices they keep: ``{"features.0": {"out": [...], "in": [...]}}``.
It is what component files store; `prune_layers` replays it on a freshly built architecture.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, cast, overload

import torch
import torch.nn as nn

from ..core.graph import ChannelGraph, Layout, is_depthwise
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


@overload
def _index(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor: ...
@overload
def _index(t: torch.Tensor | None, dim: int, idx: torch.Tensor) -> torch.Tensor | None: ...
def _index(t: torch.Tensor | None, dim: int, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.detach().index_select(dim, idx.to(t.device)).clone()


def _conv_like(m: nn.Conv2d, in_n: int, out_n: int, groups: int, **kw: Any) -> nn.Conv2d:
    """An nn.Conv2d with `m`'s kernel size, stride, padding, dilation, bias and padding mode; `kw`: device, dtype."""
    # nn.Conv2d stores these as pairs (padding may be a string); torch's stubs type them tuple[int, ...].
    kernel, stride, dilation = (cast(tuple[int, int], v) for v in (m.kernel_size, m.stride, m.dilation))
    padding = cast("str | tuple[int, int]", m.padding)
    return nn.Conv2d(in_n, out_n, kernel, stride, padding, dilation, groups,
                     bias=m.bias is not None, padding_mode=m.padding_mode, **kw)


def _resized(m: nn.Module, params: Mapping[str, torch.Tensor | None], buffers: Mapping[str, torch.Tensor | None],
             **sizes: int) -> nn.Module:
    """A copy of `m` of `m`'s own class and attributes with the given parameters, buffers and sizes.

    A rebuild from the base class (``nn.BatchNorm2d(n, eps=...)``) would drop whatever a subclass
    adds, e.g. the activation of a fused norm-activation layer; this keeps all of it. Submodules
    are copied; the large tensors are not (the new ones replace them).
    """
    new = copy.copy(m)
    # Own copies of every dict (parameters, buffers, hooks), so nothing done to one touches the other.
    new.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()}
    for k, v in params.items():
        old = m._parameters.get(k)
        new._parameters[k] = None if v is None else nn.Parameter(v, requires_grad=old is None or old.requires_grad)
    new._buffers.update(buffers)
    new._modules = {k: copy.deepcopy(child) for k, child in m._modules.items()}
    for attr, size in sizes.items():
        setattr(new, attr, size)
    return new


def kept_groups(m: nn.Conv2d, in_idx: torch.Tensor) -> int:
    """How many of `m`'s groups keep inputs when it keeps input channels `in_idx`."""
    return 1 if m.groups == 1 else len(torch.unique(in_idx // (m.in_channels // m.groups)))


def _slice_conv(m: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor, name: str = "") -> nn.Module:
    if m.groups == 1:
        return _resized(m, {"weight": _index(_index(m.weight, 0, out_idx), 1, in_idx), "bias": _index(m.bias, 0, out_idx)},
                        {}, in_channels=len(in_idx), out_channels=len(out_idx))
    # A grouped convolution stays one when each group it keeps keeps the same numbers of inputs and
    # outputs (`modellego.core.locate.keep_channels` makes sure); depthwise is the case of one each.
    qg, pg = m.out_channels // m.groups, m.in_channels // m.groups
    in_groups, out_groups = in_idx // pg, out_idx // qg
    kept = torch.unique(in_groups)  # sorted
    n = len(kept)
    if (not torch.equal(torch.unique(out_groups), kept) or len(in_idx) % n or len(out_idx) % n
            or bool((in_idx.diff() <= 0).any()) or bool((out_idx.diff() <= 0).any())
            or bool((torch.bincount(in_groups, minlength=m.groups)[kept] != len(in_idx) // n).any())
            or bool((torch.bincount(out_groups, minlength=m.groups)[kept] != len(out_idx) // n).any())):
        raise UserError(f"layer {name!r}: a convolution with groups={m.groups} must keep, in ascending order, the "
                        "same number of inputs and of outputs in every group it keeps, and inputs and outputs "
                        "of the same groups")
    local = (in_idx - in_groups * pg).view(n, -1)  # (n, inputs kept per group): positions inside the group
    rows = local[torch.searchsorted(kept, out_groups)]  # (Q', inputs kept per group): what each filter reads
    w = _index(m.weight, 0, out_idx)  # (Q', P/g, kh, kw)
    weight = w.gather(1, rows.to(w.device)[:, :, None, None].expand(-1, -1, *w.shape[2:]))  # (Q', P'/n, kh, kw)
    return _resized(m, {"weight": weight, "bias": _index(m.bias, 0, out_idx)}, {},
                    in_channels=len(in_idx), out_channels=len(out_idx), groups=n)


def _slice_linear(m: nn.Linear, out_idx: torch.Tensor, in_idx: torch.Tensor) -> nn.Module:
    return _resized(m, {"weight": _index(_index(m.weight, 0, out_idx), 1, in_idx), "bias": _index(m.bias, 0, out_idx)}, {},
                    in_features=len(in_idx), out_features=len(out_idx))


def _slice_norm(m: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> nn.Module:
    params = {"weight": _index(m.weight, 0, idx), "bias": _index(m.bias, 0, idx)} if m.affine else {}
    buffers = {"running_mean": _index(m.running_mean, 0, idx), "running_var": _index(m.running_var, 0, idx)} \
        if m.track_running_stats else {}
    if m.num_batches_tracked is not None:
        buffers["num_batches_tracked"] = m.num_batches_tracked.detach().clone()
    return _resized(m, params, buffers, num_features=len(idx))


def _slice_prelu(m: nn.PReLU, idx: torch.Tensor) -> nn.Module:
    return _resized(m, {"weight": _index(m.weight, 0, idx)}, {}, num_parameters=len(idx))


def _as_index(values: Sequence[int] | None, size: int, what: str) -> torch.Tensor:
    if values is None:
        return torch.arange(size)
    idx = torch.as_tensor(list(values), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= size):
        raise UserError(f"{what}: kept index out of range [0, {size})")
    return idx


def prune_layers(model: nn.Module, plan: Mapping[str, Mapping[str, Sequence[int]]]) -> nn.Module:
    """Replace each layer named in `plan` by a copy keeping only the listed channels (in place).

    Returns the model. Layers not in the plan are untouched.
    """
    modules = dict(model.named_modules())
    for name, keep in plan.items():
        if name not in modules:
            raise UserError(f"pruning plan names layer {name!r}, which the model does not have")
        m = modules[name]
        new: nn.Module
        if isinstance(m, nn.Conv2d):
            new = _slice_conv(m, _as_index(keep.get("out"), m.out_channels, name),
                              _as_index(keep.get("in"), m.in_channels, name), name)
        elif isinstance(m, nn.Linear):
            new = _slice_linear(m, _as_index(keep.get("out"), m.out_features, name),
                                _as_index(keep.get("in"), m.in_features, name))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            new = _slice_norm(m, _as_index(keep.get("out"), m.num_features, name))
        elif isinstance(m, nn.PReLU):
            new = _slice_prelu(m, _as_index(keep.get("out"), m.num_parameters, name))
        else:
            raise UserError(f"cannot prune layer {name!r} of type {type(m).__name__}")
        model.set_submodule(name, new)
    return model


def _inputs(m: nn.Module, in_n: int | None) -> int:
    if in_n is None:
        raise UserError(f"resizing a {type(m).__name__} needs its number of inputs")
    return in_n


def fresh_like(m: nn.Module, out_n: int, in_n: int | None = None) -> nn.Module:
    """A zero-initialised copy of layer `m` with `out_n` outputs and `in_n` inputs (same hyper-parameters)."""
    ref = next(iter(m.parameters()), None)
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    new: nn.Module
    if isinstance(m, nn.Conv2d):
        depthwise = is_depthwise(m)
        if m.groups > 1 and not depthwise:
            raise UserError(f"cannot resize a grouped convolution with groups={m.groups}: padded assembly "
                            "supports groups=1 and depthwise convolutions; assemble in parallel instead")
        new = _conv_like(m, out_n if depthwise else _inputs(m, in_n), out_n, out_n if depthwise else 1, **kw)
    elif isinstance(m, nn.Linear):
        new = nn.Linear(_inputs(m, in_n), out_n, bias=m.bias is not None, **kw)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = type(m)(out_n, eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats, **kw)
    elif isinstance(m, nn.PReLU):
        new = nn.PReLU(out_n, **kw)
    else:
        raise UserError(f"cannot resize a layer of type {type(m).__name__}")
    with torch.no_grad():
        for p in new.parameters():
            p.zero_()
    return new


def resize_layers(model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Replace each named layer by a zero-initialised one of the given sizes (in place)."""
    modules = dict(model.named_modules())
    for name, size in sizes.items():
        if name not in modules:
            raise UserError(f"layer sizes name layer {name!r}, which the model does not have")
        model.set_submodule(name, fresh_like(modules[name], int(size["out"]), size.get("in")))
    return model
