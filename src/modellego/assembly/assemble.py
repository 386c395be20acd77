"""Assembling: components (from one or several source models) into one model for the union task.

Two ways, both exact (the assembled logits equal the components' logits side by side):

- **padded** (the paper's alignment padding): components of one architecture become one network
  whose every layer is block-diagonal. Positions are tracked per tensor through the traced graph,
  so residual adds, concatenations (the paper's Appendix D) and flatten line up. Components that
  share their input normalisation stack their first-layer filters over the one input; otherwise an
  input adapter feeds each block its own normalised copy of the image.
- **parallel**: anything else (different architectures, widths, sizes, channel counts or
  normalisation): one module runs each component on its own preprocessed input and concatenates.

An `Assembly` takes raw images for the parallel mode (and padded mode with adapters) and ends in
an `OutputHead`, an identity until scaling or calibration sets it (see `modellego.assembly.scaling`).

Components of the user's own modules (no zoo architecture, no recorded input) assemble too: their
input is read from their first layer (channels) and `input_shape` (size), with no normalisation
(the assembly reads what they read). Components pad together when they are of one architecture (one
zoo or ``timm:`` / ``torchvision:`` name, else one Python class) and their traced graphs line up.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..core.graph import ChannelGraph, trace
from ..cut.prune import fresh_like, resize_layers
from ..errors import UnsupportedGraphError, UserError
from ..io.info import INFO_ATTR, AssemblySpec, InputSpec, LabelEntry, ModelInfo, get_info, set_info
from ..models import create_model
from .density import MAX_FEATURES, DensityProbe, capture

log = logging.getLogger(__name__)
RAW = "raw"  # an assembly fed raw [0, 1] images: its adapters normalise per component
_Layer = nn.Conv2d | nn.Linear  # the parametric layers of a channel graph


class InputAdapter(nn.Module):
    """Turns raw images in [0, 1] into one component's input: channels, size, normalisation.

    Shape: (B, C_raw, H, W) -> (B, C, h, w).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.channels = spec.channels
        self.size = tuple(spec.size)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            if self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif self.channels == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            else:
                raise UserError(f"cannot turn {x.shape[1]}-channel images into {self.channels}-channel input")
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class OutputHead(nn.Module):
    """out_j = scale_j · z_j + bias_j + energy_{g(j)} · logsumexp(z / temperature over group g(j)).

    Group g(j) is the component output j comes from; the log-sum-exp term is that component's own
    confidence (a "not mine" signal). Identity until `modellego.assembly.scaling` fits it.
    """

    groups: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    energy: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, groups: Sequence[int]) -> None:
        super().__init__()
        groups_t = torch.as_tensor(list(groups), dtype=torch.long)
        self.register_buffer("groups", groups_t)
        self.register_buffer("scale", torch.ones(len(groups_t)))
        self.register_buffer("bias", torch.zeros(len(groups_t)))
        self.register_buffer("energy", torch.zeros(int(groups_t.max()) + 1 if len(groups_t) else 0))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = z * self.scale.to(z.dtype) + self.bias.to(z.dtype)
        if bool((self.energy != 0).any()):
            zt = z / self.temperature.to(z.dtype)
            lse = torch.stack([zt[:, self.groups == g].logsumexp(1) for g in range(len(self.energy))], 1)  # (B, G)
            out = out + (lse * self.energy.to(z.dtype))[:, self.groups]
        return out


class Assembly(nn.Module):
    """Components put together: [adapters] -> body -> head.

    ``padded``: `body` is one block-diagonal network; with `adapters`, their outputs are
    concatenated along channels as its input. ``parallel``: `body` is a ModuleList run side by side.
    """

    def __init__(self, mode: str, body: nn.Module, head: OutputHead, adapters: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.body = body
        self.head = head
        self.adapters = adapters
        self.probe: DensityProbe | None = None  # per-component "not mine" scores, set by density scaling

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The components' logits side by side, before the head. Shape: (B, T)."""
        if self.mode == "parallel":
            assert self.adapters is not None  # a parallel assembly has one adapter per component
            return torch.cat([m(a(x)) for a, m in zip(self.adapters, cast(nn.ModuleList, self.body))], 1)
        if self.adapters is not None:
            x = torch.cat([a(x) for a in self.adapters], 1)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is None:
            return self.head(self.logits(x))
        z, inputs = capture(self.body, self.probe.layers, lambda: self.logits(x))
        return self.head(z) + self.probe(inputs)[:, self.head.groups]


def _input(info: ModelInfo) -> InputSpec:
    if info.input is None:
        raise UserError("a component without an input description cannot be assembled; save it from a trained model")
    return info.input


def _example(info: ModelInfo, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    spec = _input(info)
    return torch.zeros(2, spec.channels, *spec.size, device=device, dtype=dtype)


def _shape_arg(input_shape: Sequence[int] | None) -> tuple[int | None, tuple[int, int]] | None:
    """`input_shape` as (channels or None, (H, W)), checked."""
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if len(shape) not in (2, 3) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise UserError(f"input_shape must be (C, H, W) or (H, W) of positive integers, got {input_shape!r}")
    return (shape[0] if len(shape) == 3 else None), (shape[-2], shape[-1])


def _read_input(component: nn.Module, index: int, shape: tuple[int | None, tuple[int, int]] | None) -> InputSpec:
    """The input of a component that records none: its first convolution's channels, `shape`'s size,
    no normalisation (the assembly is fed what the component reads)."""
    name, conv = next(((n, m) for n, m in component.named_modules() if isinstance(m, _Layer)), ("", None))
    what = f"component {index} ({type(component).__name__})"
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"{what} has no input description and does not start with a Conv2d reading images; "
                        "set its ModelInfo.input (modellego.InputSpec)")
    if shape is None:
        raise UserError(f"{what} has no input description: pass input_shape=(C, H, W), e.g. its profile's "
                        "provenance['input_shape'], or set its ModelInfo.input")
    channels, size = shape
    if channels is not None and channels != conv.in_channels:
        raise UserError(f"input_shape has {channels} channels, but the first layer {name!r} of {what} reads "
                        f"{conv.in_channels}")
    c = conv.in_channels
    return InputSpec(c, size, (0.0,) * c, (1.0,) * c)


def _infos(components: Sequence[nn.Module], input_shape: Sequence[int] | None = None) -> list[ModelInfo]:
    """The components' descriptions, each with an input (read from the module where it records none)."""
    if not components:
        raise UserError("nothing to assemble")
    shape = _shape_arg(input_shape)
    infos = []
    for i, c in enumerate(components):
        info = get_info(c)
        if info is None:
            raise UserError(f"component {i} has no description; build it with modellego.disassemble or load it")
        if info.input is None:
            info = info.replace(input=_read_input(c, i, shape))
        infos.append(info)
    return infos


def _architecture(component: nn.Module, info: ModelInfo) -> str:
    """The architecture's name: the recorded one (zoo, timm:, torchvision:), else the module's class."""
    if info.arch is not None:
        return info.arch
    return f"{type(component).__module__}.{type(component).__qualname__}"


def _graph_difference(graphs: Sequence[ChannelGraph]) -> str | None:
    """Where the traced graphs differ (the first place), or ``None`` if padding can line them up."""
    def signature(g: ChannelGraph) -> list[tuple[str, str, int]]:
        return [(n.name, g.roles[n], len(g.layouts[n])) for n in g.gm.graph.nodes if n in g.roles]
    first, layers0 = signature(graphs[0]), list(graphs[0].layers)
    for i, g in enumerate(graphs[1:], 1):
        layers = list(g.layers)
        if layers != layers0:
            only0 = [n for n in layers0 if n not in g.layers]
            only = [n for n in layers if n not in graphs[0].layers]
            if only0:
                return f"layer {only0[0]!r} of component 0 is not in component {i}"
            if only:
                return f"layer {only[0]!r} of component {i} is not in component 0"
            return f"components 0 and {i} run their layers in different orders"
        for a, b in zip(first, signature(g)):
            if a != b:
                return (f"their traced graphs part at node {a[0]!r} ({a[1]}, {a[2]} segment(s)) of component 0 "
                        f"and {b[0]!r} ({b[1]}, {b[2]}) of component {i}")
        if len(signature(g)) != len(first):
            return f"component {i} traces to {len(signature(g))} nodes, component 0 to {len(first)}"
    return None


def _pad_check(components: Sequence[nn.Module], infos: Sequence[ModelInfo]) -> tuple[
        str | None, list[ChannelGraph] | None]:
    """Why the components cannot be padded (or ``None``), and their traced graphs when they can."""
    if any(i.assembly is not None for i in infos):
        return "an input is already an assembly", None
    archs = [_architecture(c, i) for c, i in zip(components, infos)]
    if len(set(archs)) != 1:
        return f"architectures differ ({', '.join(dict.fromkeys(archs))})", None
    if len({(_input(i).channels, tuple(_input(i).size)) for i in infos}) != 1:
        return "input channels or sizes differ", None
    param = next(components[0].parameters())
    try:
        graphs = [trace(c, _example(i, param.device, param.dtype)) for c, i in zip(components, infos)]
    except UnsupportedGraphError as e:
        return f"a component cannot be traced ({e})", None
    difference = _graph_difference(graphs)
    if difference:
        return difference, None
    # Padding widens every layer to the components' channels side by side, which these cannot follow.
    pinned = next((i for i, g in enumerate(graphs) if g.pinned), None)
    if pinned is not None:
        return (f"component {pinned} keeps channels whole that its own code fixes or mixes (a channel slice, "
                "split or shuffle, a norm over the channels, a per-channel constant)"), None
    grouped = next((name for name, layer in graphs[0].layers.items() if layer.grouped), None)
    if grouped is not None:
        return f"layer {grouped!r} is a grouped convolution, whose groups padding cannot widen", None
    return None, graphs


def can_pad(components: Sequence[nn.Module], *, input_shape: Sequence[int] | None = None) -> str | None:
    """``None`` if the components can be padded into one network, else the reason why not.

    Args:
        components: as for `assemble`.
        input_shape: as for `assemble`, for components that record no input.
    """
    return _pad_check(components, _infos(components, input_shape))[0]


def _positions(graphs: Sequence[ChannelGraph], stacked_input: bool) -> tuple[
        list[dict[fx.Node, torch.Tensor]], dict[int, int]]:
    """Feature positions of every component's tensors inside the assembled tensors.

    Every channel space s of the assembly lays the components' channels of s side by side
    ([component 0 | component 1 | ...]); a tensor made of several segments (a concatenation)
    or repeated over positions (a flatten) maps through its layout.
    """
    g0 = graphs[0]
    input_spaces = g0.input_spaces
    reps = sorted({g0.find(s) for s in g0.space_size})
    sizes = [{s: g.space_size[s] for s in reps} for g in graphs]
    offsets: list[dict[int, int]] = []
    total: dict[int, int] = {}
    for s in reps:
        run = 0
        for i in range(len(graphs)):
            if i == len(offsets):
                offsets.append({})
            shared = stacked_input and s in input_spaces
            offsets[i][s] = 0 if shared else run
            run = sizes[i][s] if shared else run + sizes[i][s]
        total[s] = run
    positions: list[dict[fx.Node, torch.Tensor]] = [{} for _ in graphs]
    nodes0 = {n.name: n for n in g0.layouts}
    for i, g in enumerate(graphs):
        for node in g.layouts:
            idx: list[int] = []
            base = 0
            for seg, seg0 in zip(g.segments(node), g0.segments(nodes0[node.name])):
                s = seg0.space
                start = base + offsets[i][s] * seg.spatial
                idx.extend(range(start, start + seg.channels * seg.spatial))
                base += total[s] * seg.spatial
            positions[i][node] = torch.tensor(idx, dtype=torch.long)
    return positions, total


@torch.no_grad()
def _padded_body(components: Sequence[nn.Module], graphs: Sequence[ChannelGraph], stacked_input: bool) -> tuple[
        nn.Module, dict[str, dict[str, int]], dict[str, list[list[int]]]]:
    """The block-diagonal body, its layer sizes, and each component's feature positions in every layer's input."""
    # Without stacking, each component reads its own normalised copy of the image (adapters).
    pos, _ = _positions(graphs, stacked_input)
    g0 = graphs[0]
    body = copy.deepcopy(components[0])
    body.__dict__.pop(INFO_ATTR, None)  # the body is no longer component 0
    sizes: dict[str, dict[str, int]] = {}
    inputs: dict[str, list[list[int]]] = {}
    for name, layer in g0.layers.items():
        out_idx = [p[g.layers[name].node] for p, g in zip(pos, graphs)]
        in_idx = [p[g.layers[name].input] for p, g in zip(pos, graphs)]
        if all(len(i) <= MAX_FEATURES for i in in_idx):  # where each component's features are (density scores)
            inputs[name] = [i.tolist() for i in in_idx]
        out_n = int(max(int(t.max()) for t in out_idx if len(t)) + 1)
        in_n = int(max(int(t.max()) for t in in_idx if len(t)) + 1)
        padded = cast(_Layer, fresh_like(layer.module, out_n, in_n))
        for c, o, i_ in zip(components, out_idx, in_idx):
            own = cast(_Layer, c.get_submodule(name))  # the same layer of the same architecture
            if layer.depthwise:
                padded.weight[o] = own.weight
            else:
                padded.weight[o[:, None], i_[None, :]] = own.weight
            if own.bias is not None:
                assert padded.bias is not None  # built like component 0's layer: one architecture, one bias
                padded.bias[o] = own.bias
        body.set_submodule(name, padded)
        sizes[name] = {"out": out_n, "in": in_n}
    for name in g0.channelwise_params:
        idx = [p[g.channelwise_params[name]] for p, g in zip(pos, graphs)]
        n = int(max(int(t.max()) for t in idx if len(t)) + 1)
        new = fresh_like(g0.gm.get_submodule(name), n)
        for c, o in zip(components, idx):
            m = c.get_submodule(name)
            for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t.ndim == 1 and key != "num_batches_tracked":
                    getattr(new, key)[o] = t
        if isinstance(new, nn.modules.batchnorm._BatchNorm) and new.track_running_stats:
            first = cast(nn.modules.batchnorm._BatchNorm, components[0].get_submodule(name))  # what `new` copies
            # Both track running statistics, so both have the buffer.
            assert new.num_batches_tracked is not None and first.num_batches_tracked is not None
            new.num_batches_tracked.copy_(first.num_batches_tracked)
        body.set_submodule(name, new)
        sizes[name] = {"out": n}
    return body.eval(), sizes, inputs


def _label_map(infos: Sequence[ModelInfo]) -> tuple[LabelEntry, ...]:
    entries = tuple(LabelEntry(i, info.dataset, c, n)
                    for i, info in enumerate(infos) for c, n in zip(info.classes, info.class_names))
    names = [e.display_name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"duplicate classes in the assembly: {dup}; each class may come from one component only")
    return entries


def _raw_spec(infos: Sequence[ModelInfo]) -> InputSpec:
    channels = max(_input(i).channels for i in infos)
    height, width = max(tuple(_input(i).size) for i in infos)
    return InputSpec(channels, (height, width), (0.0,) * channels, (1.0,) * channels)


def assemble(components: Sequence[nn.Module], *, mode: str = "auto",
             input_shape: Sequence[int] | None = None) -> Assembly:
    """Assemble components into one model whose outputs are all their classes, in order.

    Args:
        components: components (or whole models) with a description (`ModelInfo`), e.g. from
            `modellego.disassemble` of any traceable module.
        mode: ``padded`` (block-diagonal, one network: the paper's alignment padding),
            ``parallel`` (side by side) or ``auto`` (padded when possible).
        input_shape: ``(C, H, W)`` or ``(H, W)``, the input of components that record none
            (components of the user's own modules; e.g. their profile's
            ``provenance["input_shape"]``). Such a component reads its first convolution's
            channels at this size, unnormalised: the assembly is fed what it reads.

    Returns: an `Assembly`; ``modellego.get_info(a).assembly.label_map`` says which output
    is which class of which source, and the head is the identity (see `modellego.assembly.scaling`).

    Shape:
        parallel, or padded with adapters: raw images (B, C_raw, H, W) -> (B, T); padded over one
        shared input: the components' input (B, C, H, W) -> (B, T), T the classes of all components.
    """
    infos = _infos(components, input_shape)
    if mode not in ("auto", "padded", "parallel"):
        raise UserError(f"mode must be auto, padded or parallel, got {mode!r}")
    reason, graphs = _pad_check(components, infos) if mode != "parallel" else (None, None)
    if mode == "padded" and reason:
        raise UserError(f"cannot pad these components: {reason}; use parallel assembly")
    mode = ("parallel" if reason else "padded") if mode == "auto" else mode
    label_map = _label_map(infos)
    names = tuple(e.display_name for e in label_map)
    groups = [e.component for e in label_map]
    components = [copy.deepcopy(c).eval() for c in components]
    adapters: nn.ModuleList | None
    input_spec: InputSpec
    if mode == "parallel":
        adapters = nn.ModuleList([InputAdapter(_input(i)) for i in infos])
        model = Assembly("parallel", nn.ModuleList(components), OutputHead(groups), adapters)
        spec = AssemblySpec(mode, tuple(infos), label_map, adapters=True)
        input_spec = _raw_spec(infos)
    else:
        assert graphs is not None  # traced by _pad_check, which found no reason against padding
        stacked = len({(_input(i).mean, _input(i).std) for i in infos}) == 1
        body, sizes, inputs = _padded_body(components, graphs, stacked)
        adapters = None if stacked else nn.ModuleList([InputAdapter(_input(i)) for i in infos])
        model = Assembly("padded", body, OutputHead(groups), adapters)
        spec = AssemblySpec(mode, tuple(infos), label_map, adapters=not stacked, arch=infos[0].arch,
                            arch_kwargs=infos[0].arch_kwargs, layer_sizes=sizes, layer_inputs=inputs)
        input_spec = _input(infos[0]) if stacked else _raw_spec(infos)
    info = ModelInfo(
        arch=None, arch_kwargs={}, class_names=names, classes=tuple(range(len(names))), input=input_spec,
        dataset="+".join(dict.fromkeys(str(i.dataset) for i in infos)), kind="assembly",
        provenance={"scaling": {"method": "none"}}, assembly=spec)
    # Head and adapters are built on the CPU; the assembly lives where its components do.
    model.to(device=next(components[0].parameters()).device)
    return set_info(model.eval(), info)


def assembly_skeleton(spec: AssemblySpec, components: Sequence[nn.Module]) -> Assembly:
    """An `Assembly` of the shapes `spec` describes (weights to be loaded).

    Args:
        spec: the assembly's description.
        components: for a parallel assembly, each component's module (any weights), in order;
            ignored for a padded one, whose body is the resized zoo architecture.
    """
    adapters = nn.ModuleList([InputAdapter(_input(c)) for c in spec.components]) if spec.adapters else None
    if spec.mode == "parallel":
        body: nn.Module = nn.ModuleList([set_info(m, c) for m, c in zip(components, spec.components, strict=True)])
    else:
        if spec.arch is None:
            raise UserError("a padded assembly must record the architecture of its body")
        body = resize_layers(create_model(spec.arch, **spec.arch_kwargs), spec.layer_sizes)
    asm = Assembly(spec.mode, body, OutputHead(spec.groups), adapters)
    if spec.density:
        asm.probe = DensityProbe([(d.component, d.layer, d.features, d.classes) for d in spec.density],
                                 len(spec.components))
    return asm


def side_by_side(components: Sequence[nn.Module], x_raw: torch.Tensor, *,
                 input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Reference: each component on its own preprocessed input, logits concatenated."""
    outs = []
    with torch.no_grad():
        for c, info in zip(components, _infos(components, input_shape)):
            outs.append(c(InputAdapter(_input(info)).to(x_raw.device)(x_raw)))
    return torch.cat(outs, 1)
