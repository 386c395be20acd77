"""What the library knows about each layer type, in one table.

For every module type it follows, this module says how channels flow through it (the graph
builder reads it), and for the types with per-channel parameters how a cut keeps some of their
channels and how padded assembly rebuilds them at other sizes. A new layer type is one entry of
`LAYER_TYPES` (looked up along the module's class hierarchy, so subclasses are covered); a cut
keeps the module's own class and attributes, never a rebuild from a base class.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn as nn

from ..errors import UserError

# Modules that act on each channel on their own: relevance and channels pass straight through.
# Those with per-channel parameters (BatchNorm, PReLU) also have an entry in `LAYER_TYPES`.
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.SELU, nn.CELU,
    nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)
# Norms that mix the channels they normalise: a cut keeps those channels whole.
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)


def is_depthwise(m: nn.Conv2d) -> bool:
    """One input and one output channel per group (and more than one group).

    Pruning keeps at least two channels in a depthwise layer's space so that a component's graph
    stays the graph of its source (a one-channel depthwise conv would look like a plain conv).
    """
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def kept_groups(m: nn.Conv2d, in_idx: torch.Tensor) -> int:
    """How many of `m`'s groups keep inputs when it keeps input channels `in_idx`."""
    return 1 if m.groups == 1 else len(torch.unique(in_idx // (m.in_channels // m.groups)))


def transforms_weight(m: nn.Module) -> bool:
    """Whether a Conv2d or Linear subclass fails the property a cut relies on: removing an input's
    weights is the same as zeroing that input.

    Weight standardisation (timm's ScaledStdConv2d, as in NF-ResNets) normalises each filter over
    all its inputs in the forward pass, so dropping inputs would change the filters that remain:
    such a layer's inputs are kept whole, and recon leaves its weights as cut. Checked on a random
    input, with input 0 zeroed one way and then the other; a subclass that pads first (timm's
    Conv2dSame) or casts its weight (timm's Linear) passes.
    """
    if type(m) in (nn.Conv2d, nn.Linear) or not isinstance(m, (nn.Conv2d, nn.Linear)):
        return False
    ref = m.weight
    g = torch.Generator().manual_seed(0)
    if isinstance(m, nn.Conv2d):
        side = max(8, *(d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation)))
        x = torch.randn(1, m.in_channels, side, side, generator=g, dtype=ref.dtype).to(ref.device)
        filters = m.out_channels // m.groups  # the filters of group 0, which read input 0
    else:
        x = torch.randn(2, m.in_features, generator=g, dtype=ref.dtype).to(ref.device)
        filters = m.out_features
    zeroed = x.clone()
    zeroed[:, 0] = 0
    saved = ref.detach().clone()
    with torch.no_grad():
        want = m(zeroed)
        try:
            ref[:filters, 0] = 0
            got = m(x)
        finally:
            ref.copy_(saved)
    return got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12)


@dataclass(frozen=True)
class LayerType:
    """How one module type is read, cut and resized.

    Attributes:
        kind: ``"conv"`` or ``"linear"``: a parametric layer of the method (contributions,
            locating, recon's refit); ``"channelwise"``: per-channel parameters only.
        sizes: ``sizes(m) -> (outputs, inputs)``; inputs is None for a channel-wise layer.
        cut: ``cut(m, out_idx, in_idx, name)``: a copy keeping those channels, in that order.
        resized: ``resized(m, outputs, inputs)``: a zero-initialised copy of other sizes.
        per_channel: whether this module holds per-channel parameters (a PReLU with one shared
            slope does not), so that a cut must slice it.
    """

    kind: str
    sizes: Callable[[Any], tuple[int, int | None]]
    cut: Callable[[Any, torch.Tensor, torch.Tensor | None, str], nn.Module]
    resized: Callable[[Any, int, int | None], nn.Module]
    per_channel: Callable[[Any], bool] = lambda m: True


def layer_type(m: nn.Module) -> LayerType | None:
    """The entry of `m`'s class or nearest base class in `LAYER_TYPES`, or None."""
    for cls in type(m).__mro__:
        if cls in LAYER_TYPES:
            return LAYER_TYPES[cls]
    return None


# --- Cutting: copies of the module's own class with fewer channels --------------------------------


@overload
def _index(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor: ...
@overload
def _index(t: torch.Tensor | None, dim: int, idx: torch.Tensor) -> torch.Tensor | None: ...
def _index(t: torch.Tensor | None, dim: int, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.detach().index_select(dim, idx.to(t.device)).clone()


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


def _inputs(in_idx: torch.Tensor | None) -> torch.Tensor:
    assert in_idx is not None, "a Conv2d or Linear layer is cut with its kept inputs"
    return in_idx


def _per_output(m: nn.Module, out_idx: torch.Tensor, n_out: int) -> dict[str, torch.Tensor | None]:
    """The layer's weight and bias, and any other parameter with one entry per output (a weight
    standardisation's gain), cut to the kept outputs."""
    return {k: _index(p, 0, out_idx) for k, p in m._parameters.items()
            if k == "bias" or (k != "weight" and p is not None and p.dim() >= 1 and p.shape[0] == n_out)}


def _cut_conv(m: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor | None, name: str) -> nn.Module:
    in_idx = _inputs(in_idx)
    if m.groups == 1:
        return _resized(m, {**_per_output(m, out_idx, m.out_channels), "weight": _index(_index(m.weight, 0, out_idx), 1, in_idx)},
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
    return _resized(m, {**_per_output(m, out_idx, m.out_channels), "weight": weight}, {},
                    in_channels=len(in_idx), out_channels=len(out_idx), groups=n)


def _cut_linear(m: nn.Linear, out_idx: torch.Tensor, in_idx: torch.Tensor | None, name: str) -> nn.Module:
    in_idx = _inputs(in_idx)
    return _resized(m, {**_per_output(m, out_idx, m.out_features), "weight": _index(_index(m.weight, 0, out_idx), 1, in_idx)},
                    {}, in_features=len(in_idx), out_features=len(out_idx))


def _cut_norm(m: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor, in_idx: torch.Tensor | None, name: str) -> nn.Module:
    params = {"weight": _index(m.weight, 0, idx), "bias": _index(m.bias, 0, idx)} if m.affine else {}
    buffers = {"running_mean": _index(m.running_mean, 0, idx), "running_var": _index(m.running_var, 0, idx)} \
        if m.track_running_stats else {}
    if m.num_batches_tracked is not None:
        buffers["num_batches_tracked"] = m.num_batches_tracked.detach().clone()
    return _resized(m, params, buffers, num_features=len(idx))


def _cut_prelu(m: nn.PReLU, idx: torch.Tensor, in_idx: torch.Tensor | None, name: str) -> nn.Module:
    return _resized(m, {"weight": _index(m.weight, 0, idx)}, {}, num_parameters=len(idx))


# --- Resizing: zero-initialised layers of other sizes (padded assembly) ----------------------------


def _zeros(like: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    return None if like is None else torch.zeros(shape, dtype=like.dtype, device=like.device)


def _needs(m: nn.Module, in_n: int | None) -> int:
    if in_n is None:
        raise UserError(f"resizing a {type(m).__name__} needs its number of inputs")
    return in_n


def _resize_conv(m: nn.Conv2d, out_n: int, in_n: int | None) -> nn.Module:
    if m.groups > 1 and not is_depthwise(m):
        raise UserError(f"cannot resize a grouped convolution with groups={m.groups}: padded assembly "
                        "supports groups=1 and depthwise convolutions; assemble in parallel instead")
    groups, in_n = (out_n, out_n) if is_depthwise(m) else (1, _needs(m, in_n))
    return _resized(m, {"weight": _zeros(m.weight, out_n, in_n // groups, *m.kernel_size),
                        "bias": _zeros(m.bias, out_n)}, {}, in_channels=in_n, out_channels=out_n, groups=groups)


def _resize_linear(m: nn.Linear, out_n: int, in_n: int | None) -> nn.Module:
    in_n = _needs(m, in_n)
    return _resized(m, {"weight": _zeros(m.weight, out_n, in_n), "bias": _zeros(m.bias, out_n)}, {},
                    in_features=in_n, out_features=out_n)


def _resize_norm(m: nn.modules.batchnorm._BatchNorm, out_n: int, in_n: int | None) -> nn.Module:
    params = {"weight": _zeros(m.weight, out_n), "bias": _zeros(m.bias, out_n)} if m.affine else {}
    buffers: dict[str, torch.Tensor | None] = {}
    if m.track_running_stats:  # statistics of a fresh layer: mean 0, variance 1
        assert m.running_mean is not None and m.running_var is not None  # tracked
        buffers = {"running_mean": _zeros(m.running_mean, out_n), "running_var": torch.ones_like(m.running_var[:1])
                   .expand(out_n).clone(), "num_batches_tracked": torch.zeros_like(m.num_batches_tracked)
                   if m.num_batches_tracked is not None else None}
    return _resized(m, params, buffers, num_features=out_n)


def _resize_prelu(m: nn.PReLU, out_n: int, in_n: int | None) -> nn.Module:
    return _resized(m, {"weight": _zeros(m.weight, out_n)}, {}, num_parameters=out_n)


LAYER_TYPES: dict[type[nn.Module], LayerType] = {
    nn.Conv2d: LayerType("conv", lambda m: (m.out_channels, m.in_channels), _cut_conv, _resize_conv),
    nn.Linear: LayerType("linear", lambda m: (m.out_features, m.in_features), _cut_linear, _resize_linear),
    nn.modules.batchnorm._BatchNorm: LayerType("channelwise", lambda m: (m.num_features, None), _cut_norm, _resize_norm),
    nn.PReLU: LayerType("channelwise", lambda m: (m.num_parameters, None), _cut_prelu, _resize_prelu,
                        per_channel=lambda m: m.num_parameters > 1),
}
