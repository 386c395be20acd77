"""The channel graph of a classifier, traced with torch.fx.

Locating (walking relevance back from the logits) and pruning (removing channels physically)
both need to know, for every tensor in the forward pass, which channels are which. This module
traces the model once and records, per fx node:

- its *layout*: the tensor's feature axis (dim 1) as segments of *channel spaces*. A channel space
  is a set of channels that must be kept or dropped together: a convolution creates one; BatchNorm,
  activations, pooling, arithmetic with a number and a depthwise convolution keep it; a residual
  add merges the spaces of its addends (union-find), and so does a product of two tensors (a
  squeeze-and-excitation gate of shape (B, C, 1, 1) scaling its (B, C, H, W) input channel by
  channel; a (B, C) gate may get its trailing axes by view, unsqueeze or expand first); a
  concatenation lays spaces side by side; a flatten repeats each channel over the spatial
  positions.
- its role for relevance: pass-through, add, product, concat, flatten, slice or parametric layer.

Some ops fix the channel counts of their inputs in the model's own code: a slice ``x[:, :n]``, a
``split`` of the channels. A cut could not change those counts without changing that code, so
their spaces are *pinned*: kept whole by every cut, which stays exact and simply prunes less
there. A slice's output gets a pinned space of its own; relevance maps back by offset. So are the
operands of an add whose channels line up but whose layouts do not (a concatenation added to one
tensor, as GhostNet and ReXNet do).

Anything else that touches a tensor raises `UnsupportedGraphError` naming the op and the node, so
nothing is ever skipped or silently kept whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

try:  # lifts fx's patches for a while; private, but in every torch since 2.0
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _revert_fx_patches
except ImportError:  # pragma: no cover - then ConcreteTracer is not used (see trace_module)
    _revert_fx_patches = None  # type: ignore[assignment]

from ..errors import UnsupportedGraphError
from ..hooks import preserve_training
from .layers import CHANNEL_NORMS, CHANNELWISE_MODULES, is_depthwise, layer_type, transforms_weight

CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.selu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
# Element-wise arithmetic: with a number it acts channel by channel; of two tensors, an add merges
# residual streams and a product gates channels (squeeze-and-excitation). Two-tensor subtraction
# and division are not followed: no classifier here needs them.
MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
SCALAR_FUNCTIONS = {operator.sub, torch.sub, operator.isub, operator.truediv, torch.div, operator.itruediv}
SCALAR_METHODS = {"sub", "sub_", "div", "div_"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
# Shape changes behind the channel axis: a (B, C) gate made (B, C, 1, 1), then (B, C, H, W).
TRAILING_METHODS = {"unsqueeze", "expand", "expand_as"}
PERMUTES = {"permute", "transpose", "movedim", "swapaxes", torch.permute, torch.transpose, torch.movedim, torch.swapaxes}
CONSTANT = "modellego_constant"  # fx node meta flag: a tensor computed from attributes only
# Element-wise arithmetic that may scale or shift a tensor by a constant one (a layer scale).
ARITHMETIC_FUNCTIONS = {operator.add, torch.add, operator.iadd, operator.mul, torch.mul, operator.imul,
                        operator.sub, torch.sub, operator.isub, operator.truediv, torch.div, operator.itruediv}
ARITHMETIC_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
# Splits into a tuple of pieces, each read by a getitem: along the channel axis they pin the space.
SPLIT_METHODS = {"split", "chunk", "tensor_split"}
SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split}
# Methods and functions whose result is not a tensor we follow (shapes, sizes).
NON_TENSOR_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class Segment:
    """`channels` channels of space `space`, each repeated over `spatial` consecutive features."""

    space: int
    channels: int
    spatial: int = 1

    @property
    def features(self) -> int:
        return self.channels * self.spatial


Layout = tuple[Segment, ...]


@dataclass
class Layer:
    """A Conv2d or Linear layer of the traced graph.

    Attributes:
        name: module name in ``model.named_modules()``.
        kind: "conv" or "linear".
        module: the module.
        node: the fx node that calls it.
        input: the fx node of its input tensor.
        depthwise: a grouped conv whose every group has one input and one output channel.
    """

    name: str
    kind: str
    module: nn.Module
    node: fx.Node
    input: fx.Node
    depthwise: bool = False

    @property
    def groups(self) -> int:
        """The convolution's groups (1 for a Linear layer)."""
        return cast(nn.Conv2d, self.module).groups if self.kind == "conv" else 1

    @property
    def grouped(self) -> bool:
        """A grouped convolution other than depthwise: its groups keep equal channel counts."""
        return self.groups > 1 and not self.depthwise

    @property
    def in_features(self) -> int:
        if self.kind == "conv":
            return cast(nn.Conv2d, self.module).in_channels
        return cast(nn.Linear, self.module).in_features

    @property
    def out_features(self) -> int:
        if self.kind == "conv":
            return cast(nn.Conv2d, self.module).out_channels
        return cast(nn.Linear, self.module).out_features


@dataclass
class ChannelGraph:
    """A traced classifier: layouts per node, parametric layers, roles for the backward walk."""

    gm: fx.GraphModule
    layouts: dict[fx.Node, Layout]
    roles: dict[fx.Node, str]
    layers: dict[str, Layer]
    output: fx.Node
    space_size: dict[int, int]
    parent: dict[int, int] = field(default_factory=dict)
    channelwise_params: dict[str, fx.Node] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)
    slices: dict[fx.Node, tuple[fx.Node, torch.Tensor]] = field(default_factory=dict)

    def find(self, space: int) -> int:
        """The representative of `space` after residual adds merged spaces."""
        while self.parent.get(space, space) != space:
            space = self.parent[space]
        return space

    def segments(self, node: fx.Node) -> Layout:
        """The layout of `node` with merged spaces resolved."""
        return tuple(Segment(self.find(s.space), s.channels, s.spatial) for s in self.layouts[node])

    @property
    def num_classes(self) -> int:
        return feature_count(self.layouts[self.output])

    @property
    def input_spaces(self) -> set[int]:
        """Representatives of the channel spaces of the model's input (the image channels)."""
        return {self.find(seg.space) for n, r in self.roles.items() if r == "input" for seg in self.layouts[n]}

    @property
    def whole_spaces(self) -> set[int]:
        """Representatives of the spaces every cut keeps whole: the input's and the pinned ones."""
        return self.input_spaces | {self.find(s) for s in self.pinned}


def feature_count(layout: Layout) -> int:
    return sum(s.features for s in layout)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_shape(node: fx.Node) -> tuple[int, ...]:
    """The shape of a node known to carry a tensor: one `_tensor_args` returned, or one being visited."""
    shape = _shape(node)
    assert shape is not None, f"node {node.name!r} carries no tensor"
    return shape


def _module_name(node: fx.Node) -> str:
    """The qualified name of the module a call_module node calls (fx stores it as a string)."""
    assert isinstance(node.target, str), f"node {node.name!r} does not call a submodule"
    return node.target


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = list(node.args) + list(node.kwargs.values())
    flat: list[fx.Node] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            flat.extend(x for x in a if isinstance(x, fx.Node))
        elif isinstance(a, fx.Node):
            flat.append(a)
    # A tensor read from an attribute (a layer-scale `gamma`), or computed from such tensors alone,
    # carries no channels of the input: `_Builder` marks it constant and it gets no relevance.
    return [a for a in flat if _shape(a) is not None and not a.meta.get(CONSTANT)]


def channel_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors whose channels `node`'s output carries: its tensor arguments, less the one that
    `x.expand_as(other)` reads only for its shape."""
    if node.op == "call_method" and node.target == "expand_as":
        return _tensor_args(node)[:1]
    return _tensor_args(node)


def _gates(factor: tuple[int, ...], product: tuple[int, ...]) -> bool:
    """Whether `factor` is `product`'s shape, or the same batch and channels with every other axis 1."""
    return factor == product or (len(factor) == len(product) > 2 and factor[:2] == product[:2]
                                 and all(d == 1 for d in factor[2:]))


def _is_eval_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's `stochastic_depth(input, p, mode, training)` with training off: the identity.

    torchvision registers it with `torch.fx.wrap`, so it reaches the graph as one call; matched by
    name so that torchvision stays optional.
    """
    target = node.target
    if node.op != "call_function" or getattr(target, "__name__", "") != "stochastic_depth" or \
            not getattr(target, "__module__", "").startswith("torchvision"):
        return False
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return training is False


def _norms_channels(m: nn.LayerNorm, shape: tuple[int, ...]) -> bool:
    """Whether LayerNorm `m` (or a subclass) normalises the channel axis of an input of `shape`.

    nn.LayerNorm itself normalises the trailing ``len(normalized_shape)`` axes. A subclass may
    permute first (timm's and torchvision's LayerNorm2d normalise (B, C, H, W) over C), so its
    output on a random input is compared with both readings.
    """
    n = len(m.normalized_shape)
    trailing = n >= len(shape) - 1
    if type(m) is nn.LayerNorm or len(shape) < 3:
        return trailing
    ref = next(iter(m.parameters()), None)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0), dtype=ref.dtype if ref is not None
                    else torch.float32).to(ref.device if ref is not None else "cpu")
    with torch.no_grad(), preserve_training(m):
        m.eval()
        got = m(x)
        if tuple(m.normalized_shape) == (shape[1],):
            over_c = F.layer_norm(x.movedim(1, -1), m.normalized_shape, m.weight, m.bias, m.eps).movedim(-1, 1)
            if torch.allclose(got, over_c, rtol=1e-4, atol=1e-5):
                return True
        if tuple(m.normalized_shape) == tuple(shape[len(shape) - n:]):
            plain = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
            if torch.allclose(got, plain, rtol=1e-4, atol=1e-5):
                return trailing
    raise UnsupportedGraphError(f"cannot tell which axes the {type(m).__name__} normalises: its output is neither a "
                                "LayerNorm over the channels nor over the trailing axes")


def _is_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[_module_name(node)], (nn.Softmax, nn.LogSoftmax))
    return node.target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")


class _ExampleFailed(Exception):
    """The model's own code raised on the example: the user's error, passed on unchanged."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class ConcreteTracer(fx.Tracer):
    """torch.fx tracing in which every proxy also carries its value on one real example.

    Real forward passes ask questions of their tensors: `torch._assert(x.ndim == 4)`,
    ``if x.shape[-2:] != (28, 28): raise``, ``for i in range(x.size(1))``. Plain symbolic tracing
    cannot answer them; here each op also runs on the example, so a question about a size or a
    flag gets the example's answer and tracing goes on down the branch the example takes. The
    graph is then the model's computation for inputs of the example's shape, which is all a channel
    graph is used for. Control flow on tensor *values* stays refused: other inputs could take
    another branch.

    Convolutions, Linear layers and layers that act channel by channel (`CHANNELWISE_MODULES`),
    subclasses included (a BatchNorm with its activation inside, timm's Linear that casts its
    weight), are kept whole as leaves rather than traced into, so their parameters stay theirs
    and pruning can slice them.
    """

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example
        self.placeholders = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return layer_type(m) is not None or isinstance(m, (*CHANNELWISE_MODULES, *CHANNEL_NORMS)) or \
            super().is_leaf_module(m, module_qualified_name)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        # The op runs for real with fx's patches of Module.__call__ and friends lifted, so that a
        # module called here is not traced a second time.
        with _revert_fx_patches():
            try:
                proxy.node.meta["concrete"] = self._run(kind, target, args, kwargs)
            except Exception as e:
                raise _ExampleFailed(e) from e
        return proxy

    def _run(self, kind: str, target, args, kwargs):
        def value(a):
            return fx.node.map_aggregate(a, lambda x: x.node.meta.get("concrete") if isinstance(x, fx.Proxy) else x)

        a, k = value(args), value(kwargs)
        if kind == "placeholder":  # the input, then any further arguments at their defaults
            self.placeholders += 1
            return self.example if self.placeholders == 1 else (a[0] if a else None)
        if kind == "get_attr":
            obj = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        if kind == "call_function":
            return target(*a, **k)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **k)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **k)
        return None  # output

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = obj.node.meta["concrete"]
        if isinstance(value, torch.Tensor):  # a branch on the data: other inputs could take the other one
            raise UnsupportedGraphError(
                f"the forward pass branches on tensor values at node {obj.node.name!r}; only branches on "
                "shapes and sizes are supported")
        return bool(value)

    def iter(self, obj: fx.Proxy):
        value = obj.node.meta["concrete"]
        if isinstance(value, torch.Tensor):
            return super().iter(obj)  # iterating over data: refused like a branch on it
        return iter([operator.getitem(obj, i) for i in range(len(value))])


QUESTION_FUNCTIONS = {getattr, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                      operator.ge, operator.not_, operator.and_, operator.or_, operator.truth, len}


def _is_question(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in QUESTION_FUNCTIONS) or (
        node.op == "call_method" and node.target in NON_TENSOR_METHODS)


def trace_module(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """`model` as an fx GraphModule sharing its modules, traced on `example_input` (`ConcreteTracer`)."""
    tracer = ConcreteTracer(example_input) if _revert_fx_patches is not None else fx.Tracer()
    try:
        with preserve_training(model), torch.no_grad():
            model.eval()
            graph = tracer.trace(model)
    except _ExampleFailed as e:  # the model fails on its own input, as it would in any forward pass
        raise e.error from None
    except Exception as e:  # fx raises many types for untraceable code
        raise UnsupportedGraphError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
    for node in reversed(list(graph.nodes)):
        # Checks the example already passed (torch._assert) and the questions that only steered
        # control flow (sizes, comparisons): no part of the computation. Nothing else is removed,
        # so an in-place op whose result is unused stays.
        if (node.op == "call_function" and node.target is torch._assert) or (not node.users and _is_question(node)):
            graph.erase_node(node)
    for node in graph.nodes:
        node.meta.pop("concrete", None)  # the example's values: not kept with the graph
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def trace(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace `model` on `example_input` (Shape: (B, C, H, W)) and build its channel graph.

    Raises:
        UnsupportedGraphError: the model cannot be traced, or uses an op this library does not
            understand; the message names the op and the node.
    """
    gm = trace_module(model, example_input)
    with preserve_training(model):
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    return _Builder(gm).build()


class _Builder:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout] = {}
        self.roles: dict[fx.Node, str] = {}
        self.layers: dict[str, Layer] = {}
        self.space_size: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self.calls: dict[str, int] = {}
        self.channelwise_params: dict[str, fx.Node] = {}
        self.pinned: set[int] = set()
        self.slices: dict[fx.Node, tuple[fx.Node, torch.Tensor]] = {}
        self.pieces: dict[fx.Node, tuple[fx.Node, list[tuple[int, int]]]] = {}
        self.grouping: dict[fx.Node, tuple[fx.Node, torch.Tensor]] = {}

    def new_space(self, n: int) -> Layout:
        sid = len(self.space_size)
        self.space_size[sid] = n
        return (Segment(sid, n),)

    def find(self, s: int) -> int:
        while self.parent.get(s, s) != s:
            s = self.parent[s]
        return s

    def union(self, a: Layout, b: Layout, node: fx.Node) -> Layout:
        if len(a) != len(b) or any(x.channels != y.channels or x.spatial != y.spatial for x, y in zip(a, b)):
            if feature_count(a) != feature_count(b) or any(seg.spatial != 1 for seg in (*a, *b)):
                raise UnsupportedGraphError(
                    f"node {node.name!r} ({node.target}) combines tensors whose channel layouts differ "
                    f"({a} vs {b}); only element-wise ops over tensors of the same channels are supported"
                )
            # Channel i of one operand meets channel i of the other, but the operands are laid out
            # differently (a sliced or concatenated stream added to a plain one): no space-wide
            # equality can say which channels go together, so all of them are kept whole.
            self.pinned.update(seg.space for seg in (*a, *b))
            return a
        for x, y in zip(a, b):
            rx, ry = self.find(x.space), self.find(y.space)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
        return a

    def fail(self, node: fx.Node, why: str) -> UnsupportedGraphError:
        target = node.target
        what = (type(self.modules[_module_name(node)]).__name__ if node.op == "call_module"
                else target if isinstance(target, str) else getattr(target, "__name__", repr(target)))
        return UnsupportedGraphError(
            f"cannot follow channels through node {node.name!r} (op {node.op} {what}): {why}. "
            "Supported: Conv2d (any groups), Linear, BatchNorm, activations, pooling, "
            "dropout, arithmetic with a number, residual add, channel gating (x * gate), torch.cat on "
            "dim 1, channel slices and splits (kept whole), flatten, axes added or expanded after the "
            "channel axis."
        )

    def build(self) -> ChannelGraph:
        output: fx.Node | None = None
        for node in self.gm.graph.nodes:
            if node.op == "output":
                args = _tensor_args(node)
                if len(args) != 1:
                    raise self.fail(node, "the model must return one logits tensor")
                output = args[0]
                continue
            if node.op == "get_attr":
                node.meta[CONSTANT] = _shape(node) is not None
                continue
            shape = _shape(node)
            if shape is None:
                self._check_non_tensor(node)
                continue
            if node.op == "placeholder":
                if len(shape) < 2:
                    raise self.fail(node, f"input of shape {shape} has no channel axis")
                self.layouts[node] = self.new_space(shape[1])
                self.roles[node] = "input"
                continue
            self._visit(node, shape)
        assert output is not None
        output_shape = _shape(output)
        if output_shape is None or len(output_shape) != 2:
            raise UnsupportedGraphError(f"the model output {output.name!r} must have shape (B, classes)")
        return ChannelGraph(self.gm, self.layouts, self.roles, self.layers, output, self.space_size,
                            self.parent, self.channelwise_params, self.pinned, self.slices)

    def _check_non_tensor(self, node: fx.Node) -> None:
        if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
            return
        if (node.op == "call_method" and node.target in SPLIT_METHODS) or (
                node.op == "call_function" and node.target in SPLIT_FUNCTIONS):
            self._visit_split(node)
            return
        if node.op == "call_function" and node.target in (operator.getitem, getattr):
            return
        if node.op == "call_function" and node.target in (operator.mul, operator.add, operator.floordiv):
            return  # arithmetic on sizes
        if node.op == "call_module":
            # A leaf module returning a tuple (nn.LSTM, attention) or other non-tensor: name it
            # here rather than failing later at an anonymous getitem.
            raise self.fail(node, "the module does not return a single tensor")
        raise self.fail(node, "it produced no tensor shape during tracing")

    def _visit(self, node: fx.Node, shape: tuple[int, ...]) -> None:
        constants = [a for a in node.all_input_nodes if a.meta.get(CONSTANT)]
        inputs = channel_inputs(node)
        if constants and self._visit_constant(node, shape, inputs, constants):
            return
        if any(i in self.grouping for i in inputs):
            self._visit_grouping(node, shape, inputs)
            return
        if _is_softmax(node, self.modules):
            # Common in MNIST examples trained with NLLLoss; it mixes the classes, so a component
            # cut to a few of them could not reproduce it. Say what to do instead of "not understood".
            raise self.fail(node, "a softmax over the classes; return the logits instead and apply it "
                                  "outside the model (argmax and the ranking of samples do not change)")
        if node.op == "call_module":
            self._visit_module(node, shape, inputs)
        elif node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
            self._pass(node, inputs)
        elif node.op == "call_method" and node.target in CHANNELWISE_METHODS:
            self._pass(node, inputs)
        elif _is_eval_stochastic_depth(node):
            self._pass(node, inputs)
        elif (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean
        ):
            self._visit_mean(node, inputs)
        elif node.op == "call_function" and node.target in ADD_FUNCTIONS or (
            node.op == "call_method" and node.target in ("add", "add_")
        ):
            self._visit_add(node, inputs)
        elif node.op == "call_function" and node.target in MUL_FUNCTIONS or (
            node.op == "call_method" and node.target in ("mul", "mul_")
        ):
            self._visit_mul(node, inputs)
        elif (node.op == "call_function" and node.target in SCALAR_FUNCTIONS) or (
            node.op == "call_method" and node.target in SCALAR_METHODS
        ):
            if len(inputs) != 1:
                raise self.fail(node, "subtraction or division of two tensors")
            self._pass(node, inputs)
        elif (node.op == "call_method" and node.target in TRAILING_METHODS) or (
            node.op == "call_function" and node.target is torch.unsqueeze
        ):
            self._visit_trailing(node, shape, inputs)
        elif node.op == "call_function" and node.target in CAT_FUNCTIONS:
            self._visit_cat(node, inputs)
        elif node.op == "call_function" and node.target is operator.getitem:
            self._visit_getitem(node, shape)
        elif (node.op == "call_function" and node.target in FLATTEN_FUNCTIONS) or (
            node.op == "call_method" and node.target in FLATTEN_METHODS
        ):
            self._visit_flatten(node, shape, inputs)
        elif node.target in PERMUTES:
            raise self.fail(node, "a permute of the channel axis (a channels-last block, such as ConvNeXt's "
                                  "without conv_mlp) is not followed; channel shuffles and channel-first layers are")
        else:
            raise self.fail(node, "this op is not understood")

    def _visit_constant(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node],
                        constants: list[fx.Node]) -> bool:
        """Ops on tensors read from attributes; True when `node` is handled here.

        Computed from constants alone (``self.gamma.reshape(1, -1, 1, 1)``), the result is one too.
        Arithmetic of a tensor with a constant acts channel by channel; a constant with one value per
        channel cannot be cut with them (it is no layer's parameter), so it pins their spaces.
        """
        if not inputs:
            node.meta[CONSTANT] = True
            return True
        arithmetic = (node.op == "call_function" and node.target in ARITHMETIC_FUNCTIONS) or (
            node.op == "call_method" and node.target in ARITHMETIC_METHODS)
        if not arithmetic or len(inputs) != 1:
            raise self.fail(node, "a tensor read from an attribute (not a layer's parameter) used other than "
                                  "to scale or shift one tensor")
        for c in constants:
            cshape = _tensor_shape(c)
            aligned = (1,) * (len(shape) - len(cshape)) + cshape
            if len(cshape) > len(shape) or aligned[0] != 1:
                raise self.fail(node, f"a constant of shape {cshape} over the batch axis")
            if aligned[1] != 1:
                self.pinned.update(seg.space for seg in self.layouts[inputs[0]])
        self._pass(node, inputs)
        return True

    def _visit_norm(self, node: fx.Node, m: nn.Module, inputs: list[fx.Node]) -> None:
        """GroupNorm and LayerNorm over the channels mix them: their spaces are kept whole. A LayerNorm
        over the trailing spatial axes acts on each channel alone."""
        shape = _tensor_shape(inputs[0])
        if isinstance(m, nn.LayerNorm) and not _norms_channels(m, shape):
            self._pass(node, inputs)
            return
        self.pinned.update(seg.space for seg in self.layouts[inputs[0]])
        self._pass(node, inputs)

    def _pass(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        if len(inputs) != 1:
            raise self.fail(node, f"expected one tensor input, got {len(inputs)}")
        if _tensor_shape(node)[:2] != _tensor_shape(inputs[0])[:2]:
            raise self.fail(node, f"channel axis changed from {_shape(inputs[0])} to {_shape(node)}")
        self.layouts[node] = self.layouts[inputs[0]]
        self.roles[node] = "pass"

    def _visit_mean(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        # x.mean((2, 3)) is global average pooling: channel-wise, as long as no reduced axis is the
        # batch or channel axis (compared by index: a shape can match by coincidence).
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        ndim = len(_tensor_shape(inputs[0])) if len(inputs) == 1 else 0
        dims = (dims,) if isinstance(dims, int) else dims
        if (len(inputs) != 1 or not isinstance(dims, (tuple, list)) or not dims
                or any(not isinstance(d, int) or d % ndim in (0, 1) for d in dims)):
            raise self.fail(node, f"mean over dims {dims}: only over the spatial axes")
        self._pass(node, inputs)

    def _visit_module(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node]) -> None:
        name = _module_name(node)
        m = self.modules[name]
        self.calls[name] = self.calls.get(name, 0) + 1
        has_params = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if has_params and self.calls[name] > 1:
            raise self.fail(node, "a layer with parameters is called more than once (shared weights)")
        if len(inputs) != 1:
            raise self.fail(node, f"expected one tensor input, got {len(inputs)}")
        src = inputs[0]
        kind = lt.kind if (lt := layer_type(m)) is not None else None
        if kind == "conv":
            assert isinstance(m, nn.Conv2d)  # the table's entry for convolutions
            depthwise = is_depthwise(m)
            if m.groups > 1 and not depthwise and (len(self.layouts[src]) != 1 or self.layouts[src][0].spatial != 1):
                # Its groups would cut across the concatenated spaces (a depthwise one maps channel to channel).
                raise self.fail(node, "grouped convolution after a concatenation")
            if transforms_weight(m):  # each filter normalised over all its inputs: they stay whole
                self.pinned.update(seg.space for seg in self.layouts[src])
            self.layouts[node] = self.layouts[src] if depthwise else self.new_space(m.out_channels)
            self.roles[node] = "layer"
            self.layers[name] = Layer(name, "conv", m, node, src, depthwise)
        elif kind == "linear":
            assert isinstance(m, nn.Linear)  # the table's entry for Linear layers
            if len(_tensor_shape(src)) != 2:
                raise self.fail(node, f"Linear over a tensor of shape {_tensor_shape(src)}; flatten to (B, F) first")
            if transforms_weight(m):
                self.pinned.update(seg.space for seg in self.layouts[src])
            self.layouts[node] = self.new_space(m.out_features)
            self.roles[node] = "layer"
            self.layers[name] = Layer(name, "linear", m, node, src)
        elif kind == "channelwise" or isinstance(m, CHANNELWISE_MODULES):
            if lt is not None and lt.per_channel(m):  # a cut slices its parameters with the channels
                self.channelwise_params[name] = node
            self._pass(node, inputs)
        elif isinstance(m, CHANNEL_NORMS):
            self._visit_norm(node, m, inputs)
        elif isinstance(m, nn.Flatten):
            self._visit_flatten(node, shape, inputs)
        else:
            raise self.fail(node, "this module type is not understood")

    def _visit_add(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        if len(inputs) == 1:  # tensor + scalar
            self._pass(node, inputs)
            return
        if len(inputs) != 2 or _shape(inputs[0]) != _shape(inputs[1]):
            raise self.fail(node, "add of tensors with different shapes (broadcasting)")
        self.layouts[node] = self.union(self.layouts[inputs[0]], self.layouts[inputs[1]], node)
        self.roles[node] = "add"

    def _visit_mul(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        if len(inputs) == 1:  # tensor * number
            self._pass(node, inputs)
            return
        shapes = [_tensor_shape(i) for i in inputs]
        if len(inputs) != 2 or not all(_gates(s, _tensor_shape(node)) for s in shapes):
            raise self.fail(node, f"product of tensors of shapes {shapes}: only equal shapes, or a "
                                  "(B, C, 1, 1) gate times a (B, C, H, W) tensor")
        # Output channel c reads channel c of both factors: kept or dropped together.
        self.layouts[node] = self.union(self.layouts[inputs[0]], self.layouts[inputs[1]], node)
        self.roles[node] = "mul"

    def _visit_cat(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        ndim = len(_tensor_shape(node))
        if dim not in (1, 1 - ndim):
            raise self.fail(node, f"concatenation along dim {dim} (only the channel axis, dim 1)")
        self.layouts[node] = tuple(seg for src in inputs for seg in self.layouts[src])
        self.roles[node] = "cat"

    def _slice(self, node: fx.Node, src: fx.Node, index: torch.Tensor) -> None:
        """Channel j of `node` is channel ``index[j]`` of `src`: the same layout when that is all of them
        in order, else a pinned space of its own, and `src`'s spaces pinned too (the model's code fixes
        the counts)."""
        layout = self.layouts[src]
        if any(seg.spatial != 1 for seg in layout):
            raise self.fail(node, "a slice or shuffle of a flattened tensor")
        if torch.equal(index, torch.arange(feature_count(layout))):
            self.layouts[node] = layout
        else:
            self.pinned.update(seg.space for seg in layout)
            self.layouts[node] = self.new_space(len(index))
            self.pinned.add(self.layouts[node][0].space)
        self.slices[node] = (src, index)
        self.roles[node] = "slice"

    def _visit_split(self, node: fx.Node) -> None:
        """``x.split(n, 1)``, ``torch.chunk(x, k, 1)``, ...: a tuple of pieces, each taken by a getitem."""
        src = node.args[0] if node.args else None
        metas = node.meta.get("tensor_meta")
        if not isinstance(src, fx.Node) or _shape(src) is None or not isinstance(metas, (tuple, list)):
            raise self.fail(node, "a split of something other than one tensor")
        ndim = len(_tensor_shape(src))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if not isinstance(dim, int) or dim % ndim == 0:
            raise self.fail(node, f"a split along dim {dim} (the channel or a spatial axis only)")
        sizes = [int(m.shape[dim]) for m in metas]
        if dim % ndim != 1:  # along a spatial axis every piece keeps all channels
            self.pieces[node] = (src, [(0, _tensor_shape(src)[1])] * len(sizes))
            return
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.pieces[node] = (src, list(zip(offsets[:-1], offsets[1:])))

    def _visit_getitem(self, node: fx.Node, shape: tuple[int, ...]) -> None:
        """A piece of a split, or ``x[..., a:b, ...]`` with slices: channels [start, stop) of a tensor."""
        src, index = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and src in self.pieces and isinstance(index, int):
            split_src, ranges = self.pieces[src]
            self._slice(node, split_src, torch.arange(*ranges[index]))
            return
        if not isinstance(src, fx.Node) or _shape(src) is None:
            raise self.fail(node, "indexing of something other than a tensor or a split")
        src_shape = _tensor_shape(src)
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(src_shape) - len(index) + 1) + index[at + 1:]
        index = index + (slice(None),) * (len(src_shape) - len(index))
        if len(index) != len(src_shape) or not all(isinstance(i, slice) for i in index):
            raise self.fail(node, f"indexing with {node.args[1]}: only slices (x[:, a:b], x[..., 1:]) are supported")
        batch, channels = cast(tuple[slice, ...], index)[:2]
        if batch.indices(src_shape[0]) != (0, src_shape[0], 1):
            raise self.fail(node, "a slice of the batch axis")
        start, stop, step = channels.indices(src_shape[1])
        if step != 1 or stop <= start or shape[1] != stop - start:
            raise self.fail(node, f"a channel slice {start}:{stop}:{step} (only steps of 1)")
        self._slice(node, src, torch.arange(start, stop))

    def _visit_trailing(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node]) -> None:
        src = inputs[0] if len(inputs) == 1 and node.args and inputs[0] is node.args[0] else None
        src_shape = _shape(src) if src is not None else None
        if src is None or src_shape is None or len(src_shape) < 2 or shape[:2] != src_shape[:2]:
            raise self.fail(node, f"{src_shape} to {shape}: only axes after the channel axis may be added or expanded")
        if node.target in ("unsqueeze", torch.unsqueeze):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if not isinstance(dim, int) or dim % len(shape) < 2:
                raise self.fail(node, f"unsqueeze at dim {dim}: only after the channel axis")
        layout = self.layouts[src]  # expand can only grow axes of size 1: dims 0 and 1 are unchanged
        other = _tensor_args(node)[1:]
        if node.target == "expand_as" and other:
            # `other` lends only its shape, so it gets no relevance (`channel_inputs`), but a cut must
            # keep its channel count equal to this tensor's: the two spaces are kept or dropped together.
            layout = self.union(layout, self.layouts[other[0]], node)
        self.layouts[node] = layout
        self.roles[node] = "pass"

    def _visit_grouping(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node]) -> None:
        """The steps of a channel shuffle after ``x.view(B, g, C // g, H, W)``: swap the two channel
        axes, make it contiguous, view it as (B, C, H, W) again; then a permutation of x's channels."""
        src = inputs[0]
        origin, index = self.grouping[src]  # index[a, b]: the channel of `origin` at position (a, b)
        target = node.target
        args = node.args[1:]
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        swap = (target in ("transpose", torch.transpose) and dims in ([1, 2], [2, 1])) or (
            target == "permute" and dims == [0, 2, 1, *range(3, len(shape))])
        if len(inputs) != 1:
            raise self.fail(node, "a channel grouping (a view to (B, g, C/g, ...)) combined with another tensor")
        if swap:
            self.grouping[node] = (origin, index.T)
        elif target in ("contiguous", "clone"):
            self.grouping[node] = (origin, index)
        elif target in FLATTEN_METHODS | FLATTEN_FUNCTIONS and shape == _tensor_shape(origin):
            self._slice(node, origin, index.flatten())
        else:
            raise self.fail(node, "after a channel grouping (a view to (B, g, C/g, ...)) only a transpose of the two "
                                  "channel axes and a view back to (B, C, ...) are supported (a channel shuffle)")

    def _visit_flatten(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node]) -> None:
        src = inputs[0] if inputs else None
        src_shape = _shape(src) if src is not None else None
        if (src is not None and src_shape is not None and len(shape) == len(src_shape) + 1 >= 4
                and shape[0] == src_shape[0] and shape[1] * shape[2] == src_shape[1] and shape[3:] == src_shape[2:]):
            # (B, C, H, W) viewed as (B, g, C/g, H, W): the first step of a channel shuffle.
            self.grouping[node] = (src, torch.arange(src_shape[1]).view(shape[1], shape[2]))
            return
        if (src is not None and src_shape is not None and len(src_shape) == 2 and shape[:2] == src_shape
                and all(d == 1 for d in shape[2:])):
            self._pass(node, [src])  # (B, C) kept as it is, or viewed as (B, C, 1, 1): a gate about to scale a map
            return
        if src is None or src_shape is None or len(shape) != 2 or shape[0] != src_shape[0]:
            raise self.fail(node, f"reshape from {src_shape} to {shape}: only (B, C, ...) -> (B, C*...) is supported")
        spatial = 1
        for d in src_shape[2:]:
            spatial *= d
        layout = self.layouts[src]
        if any(s.spatial != 1 for s in layout):
            raise self.fail(node, "flatten of an already flattened tensor")
        self.layouts[node] = tuple(Segment(s.space, s.channels, spatial) for s in layout)
        self.roles[node] = "flatten"
