"""Layer-wise least-squares reconstruction of a component (training-free; beyond the paper).

Cutting channels removes, from every kept filter, the contributions of its dropped inputs. The
last-layer fixes of `modellego.calibrate` cannot bring back features lost deeper in the network.
Reconstruction refits every kept Conv2d and Linear layer in closed form, first to last. Each
layer's weights and bias are solved by ridge regression so that, on training images of the task,
the layer's output from the component's own (already reconstructed) inputs matches the source
layer's output on the kept channels. This is the reconstruction step of channel pruning (He et
al., 2017; ThiNet) applied to an MDA component. It uses no labels and no gradient step.

The source's BatchNorm statistics stay valid, since each layer again produces what the source's
layer produced. Do not combine with ``bn`` re-estimation, which renormalises to the task's images.

Cost. Both models advance through their traced graphs together, node by node, holding every
calibration batch's live values (the *frontier*) between layers: one forward pass of each model
in all. Where the frontier outgrows `memory_budget`, or a model does not trace, each layer's
values come from forward passes that stop at that layer instead: O(L²) node runs for L layers,
with the same results.

Residual adds. A layer whose output reaches an add through at most one BatchNorm (the last
convolution of a residual branch, or a shortcut's projection) is fitted so that the add's output,
not the layer's own, matches the source: its target also absorbs the difference between the
source's and the component's other operand, divided by the BatchNorm's per-channel scale. The
shortcut's error would otherwise pass from block to block uncorrected; He et al. (2017) use the
same target for multi-branch networks.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from .contribution import pad_input
from .errors import UserError
from .graph import ADD_FUNCTIONS, is_depthwise
from .hooks import forward_hooks, preserve_training

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _run_until(model: nn.Module, name: str, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """The input (or output) of layer `name` on `x`; the forward pass stops there."""
    got: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor | None = None):
        got.append((out if output else inputs[0]).detach())
        raise _Stop

    with forward_hooks(model, {name: hook}, pre=not output), torch.no_grad():
        try:
            model(x)
        except _Stop:
            pass
    if not got:
        raise UserError(f"layer {name!r} did not run in the forward pass; it cannot be reconstructed")
    return got[0]


@dataclass(frozen=True)
class Join:
    """A layer whose output reaches a residual add through at most one BatchNorm."""

    node: str  # the fx node of the layer's call
    input: str  # the fx node of its input
    other: str  # the fx node of the add's other operand
    norm: str | None  # the BatchNorm module between the layer and the add


def residual_joins(gm: fx.GraphModule) -> dict[str, Join]:
    """Layers (by module name) whose output flows, through at most one BatchNorm with running
    statistics (an affine map in eval mode), into a two-operand add."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    joins: dict[str, Join] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        cur, norm = node, None
        if len(cur.users) == 1:
            user = next(iter(cur.users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
                cur, norm = user, user.target
        if len(cur.users) != 1 or calls[node.target] > 1 or (norm is not None and calls[norm] > 1):
            continue
        add = next(iter(cur.users))
        if add.op != "call_function" or add.target not in ADD_FUNCTIONS or add.kwargs or len(add.args) != 2:
            continue
        other = add.args[1] if add.args[0] is cur else add.args[0]
        inp = node.args[0] if node.args else None
        if isinstance(other, fx.Node) and other is not cur and isinstance(inp, fx.Node):
            joins[node.target] = Join(node.name, inp.name, other.name, norm)
    return joins


def _layers_before(gm: fx.GraphModule, name: str) -> set[str]:
    """Module names of every call that the value of node `name` depends on."""
    nodes = {n.name: n for n in gm.graph.nodes}
    seen, stack, found = set(), [nodes[name]], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            found.add(n.target)
        stack.extend(n.all_input_nodes)
    return found


class _Capture(fx.Interpreter):
    """Runs a traced model until the values of some nodes are known, or until node `before`."""

    def __init__(self, gm: fx.GraphModule, names: set[str], before: str | None) -> None:
        super().__init__(gm)
        self.names, self.before = names, before
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        if n.name == self.before:
            raise _Stop
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach()  # by reference: in-place ops until the stop show
            if len(self.values) == len(self.names) and self.before is None:
                raise _Stop
        return out


def _node_values(gm: fx.GraphModule, names: set[str], x: torch.Tensor,
                 before: str | None = None) -> dict[str, torch.Tensor]:
    """The values of nodes `names` on `x` from one forward pass, as they are just before node
    `before` runs, or once they are all known."""
    cap = _Capture(gm, names, before)
    try:
        cap.run(x)
    except _Stop:
        pass
    assert cap.values.keys() == names, names - cap.values.keys()
    return cap.values


class _Frontier:
    """Every batch's live values in one traced model, advanced node by node, all batches in step.

    Values are freed after their last use, as `fx.Interpreter.run` frees them; nodes in `keep` are
    also held (by reference, not copied) until `take` has read them `keep[name]` times. A read
    thus sees the value as the forward pass has it at the cursor, in-place changes included, as
    a pass that stops there does.
    """

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor], keep: Mapping[str, int]) -> None:
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.runs = []
        for x in inputs:
            run = fx.Interpreter(gm)
            run.args_iter = iter([x])
            self.runs.append(run)
        self.cursor = 0  # index of the next node to run
        self.reads = dict(keep)
        self.kept: list[dict[str, torch.Tensor]] = [{} for _ in inputs]

    def advance(self, stop: int) -> None:
        """Run every node before index `stop` (no-op when already past it)."""
        for node in self.nodes[self.cursor:stop]:
            for run, kept in zip(self.runs, self.kept):
                out = run.env[node] = run.run_node(node)
                if node.name in self.reads:
                    kept[node.name] = out.detach()
                for dead in run.user_to_last_uses.get(node, ()):
                    del run.env[dead]
        self.cursor = max(self.cursor, stop)

    def current(self, name: str) -> list[torch.Tensor]:
        """The live value of node `name` in every batch, as the next node would read it."""
        node = self.nodes[self.index[name]]
        return [run.env[node].detach() for run in self.runs]

    def take(self, name: str) -> list[torch.Tensor]:
        """The held value of node `name` in every batch (released after its last expected read)."""
        values = [kept[name] for kept in self.kept]
        self.reads[name] -= 1
        if self.reads[name] == 0:
            for kept in self.kept:
                del kept[name]
        return values

    def nbytes(self) -> int:
        """Bytes of the storages held, each counted once (a held value often is a live one too)."""
        live = [v for run in self.runs for v in run.env.values()] + [v for kept in self.kept for v in kept.values()]
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in live
                    if isinstance(v, torch.Tensor)}
        return sum(storages.values())


def _norm_scale(norm: nn.Module | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """Per-channel slope of an eval-mode BatchNorm (ones without one). Shape: (n,)."""
    if norm is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    return scale.detach().to(like)


def _absorb(target: torch.Tensor, gap: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The layer target that makes the add match the source: target + gap / scale, channel by channel.

    A channel the BatchNorm nearly zeroes keeps its plain target (no division blow-up).
    Shape: target and gap (B, Q, ...), scale (Q,).
    """
    ok = scale.abs() > 1e-6
    inv = torch.where(ok, 1 / torch.where(ok, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return target + gap * inv.view(1, -1, *([1] * (gap.dim() - 2)))


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the Conv2d and Linear layers of `model` in the order a forward pass runs them."""
    order: list[str] = []
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if name not in order:
                order.append(name)
        return hook

    with forward_hooks(model, {n: hook_for(n) for n in names}), torch.no_grad():
        model(x[:1])
    return order


class _Normal:
    """Streaming normal equations of one layer: Σxxᵀ, Σxyᵀ, Σx, Σy, Σy² per group (float64)."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Shape: x (G, N, F), y (G, N, T): G independent groups of N rows."""
        # Products in the data's precision (float32 is 2-4x faster), sums in float64.
        y = y.to(x.dtype)
        parts = [x.transpose(1, 2) @ x, x.transpose(1, 2) @ y, x.sum(1), y.sum(1), (y * y).sum(1)]
        parts = [p.double().cpu() for p in parts]  # (G,F,F) (G,F,T) (G,F) (G,T) (G,T)
        self.sums = parts if self.sums is None else [a + p for a, p in zip(self.sums, parts)]
        self.n += x.shape[1]

    def solve(self, ridge: float, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """W (G, F, T), b (G, T) minimising Σ||x W + b - y||² + λ||W||² per group, and the fit's R²."""
        gram, cross, sx, sy, syy = self.sums
        mx, my = sx / self.n, sy / self.n  # (G, F), (G, T)
        if intercept:
            gram = gram - self.n * mx[:, :, None] * mx[:, None, :]
            cross = cross - self.n * mx[:, :, None] * my[:, None, :]
        lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)  # (G,)  scale-free ridge
        eye = torch.eye(gram.shape[1], dtype=gram.dtype)
        w = torch.linalg.solve(gram + lam[:, None, None] * eye, cross)  # (G, F, T)
        b = my - (mx[:, None, :] @ w)[:, 0] if intercept else None  # (G, T)
        # Residual from the moments: Σy² - 2<W, C> + <W, G W> (centred when fitting an intercept).
        var = float((syy - self.n * my * my).sum())
        yy = var if intercept else float(syy.sum())
        rss = yy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
        return w, b, (1 - rss / var if var > 0 else 1.0)


def _sample(n: int, limit: int, gen: torch.Generator) -> torch.Tensor:
    """At most `limit` sorted random indices of range(n) (all of them when n <= limit)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def _conv_rows(m: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor, limit: int, gen: torch.Generator):
    """Regression rows of a convolution at up to `limit` random output positions.

    Only the sampled patches are gathered (an unfold of the whole batch would cost B·L·P·K).
    Shape: x (G, N, F), y (G, N, T), with G = 1 and F = P·K, or G = channels and F = K (depthwise).
    """
    b, q, oh, ow = out.shape
    n = b * oh * ow
    pos = _sample(n, limit, gen).to(out.device)
    bi, rest = pos // (oh * ow), pos % (oh * ow)
    oy, ox = rest // ow, rest % ow
    (sh, sw), (dh, dw), (kh, kw) = m.stride, m.dilation, m.kernel_size
    padded = pad_input(m, inp).permute(0, 2, 3, 1)  # (B, H + top + bottom, W + left + right, P)
    dy = torch.arange(kh, device=out.device) * dh
    dx = torch.arange(kw, device=out.device) * dw
    rows = (oy * sh)[:, None, None] + dy[None, :, None]  # (N, kh, 1)
    cols = (ox * sw)[:, None, None] + dx[None, None, :]  # (N, 1, kw)
    patches = padded[bi[:, None, None], rows, cols]  # (N, kh, kw, P)
    target = out[bi, :, oy, ox]  # (N, Q)
    if is_depthwise(m):
        x = patches.permute(3, 0, 1, 2).reshape(q, len(pos), kh * kw)  # (C, N, K)
        return x, target.T[:, :, None]  # (C, N, 1)
    x = patches.permute(0, 3, 1, 2).reshape(1, len(pos), -1)  # (1, N, P*K), unfold's order
    return x, target[None]  # (1, N, Q)


def _check(m: nn.Module, name: str) -> None:
    if isinstance(m, nn.Conv2d):
        if m.groups > 1 and not is_depthwise(m):
            raise UserError(f"cannot reconstruct {name!r}: grouped convolution with groups={m.groups}")


# Bytes of batch values that the frontier may hold between layers before falling back to passes.
DEFAULT_MEMORY_BUDGET = 2 << 30


@torch.no_grad()
def reconstruct(
    component: nn.Module,
    source: nn.Module,
    plan: Mapping[str, Mapping[str, Sequence[int]]],
    inputs: Sequence[torch.Tensor],
    *,
    ridge: float = 1e-3,
    rows_per_batch: int = 8192,
    seed: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> dict[str, float]:
    """Refit every Conv2d and Linear layer of `component` to reproduce `source`'s kept outputs (in place).

    Args:
        component: the component, cut from `source` with `plan`.
        source: the model it was cut from (not modified).
        plan: the pruning plan relative to `source` (`modellego.prune.build_plan`).
        inputs: batches of TRAINING images of the task. Shape: (B, C, H, W) each.
        ridge: ridge strength relative to the mean feature variance.
        rows_per_batch: regression rows (output positions) sampled per batch and layer; bounds
            time and memory on large feature maps.
        seed: seed of that sampling.
        memory_budget: bytes of every batch's live values that may be held between layers (one
            pass of each model); beyond it, each layer re-runs the models up to itself (slower,
            same result). 0 always re-runs.
        progress: show a progress bar over the layers.

    Returns: the fraction of the target's variance explained (R²) per layer, after the refit.
    """
    modules, src_modules = dict(component.named_modules()), dict(source.named_modules())
    gen = torch.Generator().manual_seed(seed)
    order = execution_order(component, inputs[0])
    for name in order:  # refuse before any layer changes, so a failure leaves the component as it was
        _check(modules[name], name)
        if name not in plan or name not in src_modules:
            raise UserError(f"cannot reconstruct {name!r}: the pruning plan or the source lacks it")
    comp_gm, src_gm = _traced(component), _traced(source)
    joins: dict[str, Join] = {}
    if comp_gm is not None and src_gm is not None:
        src_nodes = {n.name for n in src_gm.graph.nodes}
        rank = {n: i for i, n in enumerate(order)}
        # Only an operand that is final when the layer is refitted can be compensated: a shortcut's
        # projection that runs after its branch is fitted last instead, against the refitted branch.
        joins = {k: j for k, j in residual_joins(comp_gm).items()
                 if {j.node, j.other} <= src_nodes and all(rank.get(a, -1) < rank[k] for a in _layers_before(comp_gm, j.other))}
    r2: dict[str, float] = {}
    with preserve_training(component), preserve_training(source):
        component.eval()
        source.eval()
        steps = _frontier_steps(comp_gm, src_gm, order, joins, inputs, memory_budget) if memory_budget > 0 else None
        for name in tqdm(order, desc="recon", unit="layer", disable=None if progress else True):
            join = joins.get(name)
            values = None
            if steps is not None and name in steps.layers:
                values = steps.values(name, join)
                if steps.nbytes() > memory_budget:
                    log.info("recon: the batches' values outgrow %d bytes at %s; the next layers re-run the "
                             "models up to themselves", memory_budget, name)
                    steps = None
            if values is None:  # one batch at a time
                values = (_pass_values(name, join, component, source, (comp_gm, src_gm), x) for x in inputs)
            norm = modules[join.norm] if join is not None and join.norm else None
            r2[name] = _refit(name, modules[name], plan, values, norm, ridge=ridge, rows_per_batch=rows_per_batch,
                              gen=gen)
    return r2


# Per batch: the layer's input in the component, the source's value that the target is made
# from (the layer's output), and for a join the add's other operand in the source and component.
Values = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class _Steps:
    """Both models' frontiers, advanced to each layer in turn."""

    def __init__(self, comp: _Frontier, src: _Frontier, calls: tuple[dict[str, str], dict[str, str]],
                 layers: set[str]) -> None:
        self.comp, self.src, self.calls, self.layers = comp, src, calls, layers

    def values(self, name: str, join: Join | None) -> list[Values]:
        """Every batch's values for layer `name`. The component stops just before the layer runs,
        the source just after the last value needed, where the per-layer passes stop too."""
        comp_call, src_call = self.calls[0][name], self.calls[1][name]
        self.comp.advance(self.comp.index[comp_call])
        stop = _source_stop(self.src.index, src_call, join)
        assert self.src.cursor <= stop, (name, self.src.cursor, stop)  # `_frontier_steps` serves no other
        self.src.advance(stop)
        call = self.comp.nodes[self.comp.index[comp_call]]
        inp = self.comp.current(call.args[0].name)
        target = self.src.take(src_call)
        if join is None:
            return [(i, t, None, None) for i, t in zip(inp, target)]
        return list(zip(inp, target, self.src.take(join.other), self.comp.current(join.other)))

    def nbytes(self) -> int:
        return self.comp.nbytes() + self.src.nbytes()


def _source_needs(call: str, join: Join | None) -> list[str]:
    """The source nodes a layer reads: its output (node `call`), and a join's other operand."""
    return [call] + ([join.other] if join is not None else [])


def _source_stop(index: Mapping[str, int], call: str, join: Join | None) -> int:
    """Index of the source node after the last one that `_source_needs` names."""
    return max(index[n] for n in _source_needs(call, join)) + 1


def _first_calls(gm: fx.GraphModule) -> dict[str, str]:
    """Module name -> the node of its first call."""
    calls: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in calls:
            calls[node.target] = node.name
    return calls


def _frontier_steps(comp_gm: fx.GraphModule | None, src_gm: fx.GraphModule | None, order: Sequence[str],
                    joins: Mapping[str, Join], inputs: Sequence[torch.Tensor], memory_budget: int) -> _Steps | None:
    """The frontiers for the layers they can serve within `memory_budget`; None when a model does
    not trace or the first layer would not fit."""
    if comp_gm is None or src_gm is None:
        return None
    comp_calls, src_calls = _first_calls(comp_gm), _first_calls(src_gm)
    comp_nodes = {n.name: (i, n) for i, n in enumerate(comp_gm.graph.nodes)}
    src_index = {n.name: i for i, n in enumerate(src_gm.graph.nodes)}
    layers: list[str] = []
    last, src_last = -1, -1
    for name in order:
        # The component stops just before each layer runs, in graph order. A layer that is not a
        # node of its own, or runs out of that order, may already have run with its old weights:
        # from there on, every layer takes passes.
        if name not in comp_calls or name not in src_calls or comp_nodes[comp_calls[name]][0] < last:
            break
        at, call = comp_nodes[comp_calls[name]]
        join = joins.get(name)
        # An input that is not a node, an add operand computed after the layer, or source values
        # that an earlier layer's reads already ran past (in-place ops may have changed them since):
        # this layer takes passes; the frontier runs it only after its refit.
        stop = _source_stop(src_index, src_calls[name], join)
        if not call.args or not isinstance(call.args[0], fx.Node) or stop < src_last or (
                join is not None and comp_nodes.get(join.other, (len(comp_nodes),))[0] > at):
            continue
        layers.append(name)
        last, src_last = at, stop

    def steps(batches: Sequence[torch.Tensor], served: Sequence[str]) -> _Steps:
        keep: dict[str, int] = {}
        for name in served:
            for node in _source_needs(src_calls[name], joins.get(name)):
                keep[node] = keep.get(node, 0) + 1
        return _Steps(_Frontier(comp_gm, batches, {}), _Frontier(src_gm, batches, keep), (comp_calls, src_calls),
                      set(served))

    # Sizes scale with the number of images: one image through the same steps predicts them, so
    # the frontier stops before the layer where it would outgrow the budget, not after.
    probe, images = steps([inputs[0][:1].clone()], layers), sum(len(x) for x in inputs)  # own storage
    for i, name in enumerate(layers):
        probe.values(name, joins.get(name))
        if probe.nbytes() * images > memory_budget:
            log.info("recon: the batches' values would outgrow %d bytes at %s; it and the next layers re-run "
                     "the models up to themselves", memory_budget, name)
            layers = layers[:i]
            break
    return steps(inputs, layers) if layers else None


def _traced(model: nn.Module) -> fx.GraphModule | None:
    """The model traced by torch.fx, sharing its modules; None when it does not trace (no joins then)."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # fx raises many types; reconstruction then fits every layer to its own output
        log.debug("%s does not trace; residual adds are not compensated", type(model).__name__)
        return None


def _pass_values(name: str, join: Join | None, component: nn.Module, source: nn.Module,
                 graphs: tuple[fx.GraphModule | None, fx.GraphModule | None], x: torch.Tensor) -> Values:
    """One batch's values for layer `name`, from forward passes that stop at the layer."""
    if join is None:
        return _run_until(component, name, x, output=False), _run_until(source, name, x, output=True), None, None
    # One pass of each model gives both the layer's values and the add's other operand.
    src = _node_values(graphs[1], {join.node, join.other}, x)
    comp = _node_values(graphs[0], {join.input, join.other}, x, before=join.node)  # as the layer finds them
    return comp[join.input], src[join.node], src[join.other], comp[join.other]


def _refit(name: str, m: nn.Module, plan: Mapping[str, Mapping[str, Sequence[int]]], values: Iterable[Values],
           norm: nn.Module | None, *, ridge: float, rows_per_batch: int, gen: torch.Generator) -> float:
    """Refit one layer of `component` in place (`norm`: the join's BatchNorm, if any); returns its R²."""
    out_idx = torch.as_tensor(list(plan[name]["out"]), dtype=torch.long)
    eqs = _Normal()
    for inp, source_out, other_src, other_comp in values:
        idx = out_idx.to(inp.device)
        target = source_out.index_select(1, idx)
        if other_src is not None:
            other_src = other_src.index_select(1, idx)
            if other_comp.shape == target.shape == other_src.shape:
                target = _absorb(target, other_src - other_comp, _norm_scale(norm, target.shape[1], target))
        if isinstance(m, nn.Conv2d):
            eqs.update(*_conv_rows(m, inp, target, rows_per_batch, gen))
        else:
            xi, yi = inp.reshape(1, -1, inp.shape[-1]), target.reshape(1, -1, target.shape[-1])  # (1, N, P)
            rows = _sample(xi.shape[1], rows_per_batch, gen).to(xi.device)
            eqs.update(xi[:, rows], yi[:, rows])
    w, b, fit = eqs.solve(ridge, intercept=m.bias is not None)
    _write(m, w, b)
    log.debug("reconstructed %s: R² %.4f over %d rows", name, fit, eqs.n)
    return round(fit, 4)


def _write(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Store solved weights. Shape: w (G, F, T), b (G, T)."""
    if isinstance(m, nn.Conv2d) and is_depthwise(m):
        weight = w[:, :, 0].reshape(m.weight.shape)  # (C, K) -> (C, 1, kh, kw)
        bias = b[:, 0] if b is not None else None
    else:
        weight = w[0].T.reshape(m.weight.shape)  # (T, F) -> (Q, P, kh, kw) or (Q, P)
        bias = b[0] if b is not None else None
    m.weight.copy_(weight.to(m.weight))
    if bias is not None:
        m.bias.copy_(bias.to(m.bias))
