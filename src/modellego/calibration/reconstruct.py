"""Layer-wise least-squares reconstruction of a component (training-free; beyond the paper).

Cutting channels removes, from every kept filter, the contributions of its dropped inputs. The
last-layer fixes of `modellego.calibration.calibrate` cannot bring back features lost deeper in the network.
Reconstruction refits every kept Conv2d and Linear layer in closed form, first to last. Each
layer's weights and bias are solved by ridge regression so that, on training images of the task,
the layer's output from the component's own (already reconstructed) inputs matches the source
layer's output on the kept channels. This is the reconstruction step of channel pruning (He et
al., 2017; ThiNet) applied to an MDA component. It uses no labels and no gradient step.

The source's BatchNorm statistics stay valid, since each layer again produces what the source's
layer produced. Do not combine with ``bn`` re-estimation, which renormalises to the task's images.

Cost (`modellego.calibration.frontier`). Both models advance through their traced graphs together, node by
node, holding every calibration batch's live values (the *frontier*) between layers: one forward
pass of each model in all. Where the frontier would outgrow `memory_budget`, the layers take one
batch at a time, each model resuming from its last checkpoint before the layer (a value saved
to disk where it was the only one live), so each layer re-runs only the nodes since then. Where a
model does not trace, or for a layer out of graph order, the values come from forward passes
that stop at the layer: O(L²) node runs for L layers. All three give the same weights.

Residual adds. A layer whose output reaches an add through at most one BatchNorm (the last
convolution of a residual branch, or a shortcut's projection) is fitted so that the add's output,
not the layer's own, matches the source: its target also absorbs the difference between the
source's and the component's other operand, divided by the BatchNorm's per-channel scale. The
shortcut's error would otherwise pass from block to block uncorrected; He et al. (2017) use the
same target for multi-branch networks.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.contribution import pad_input
from ..core.distributed import all_sum, first_index
from ..core.graph import ADD_FUNCTIONS, trace_module
from ..core.keyed import keyed
from ..core.layers import transforms_weight
from ..errors import UnsupportedGraphError, UserError
from ..hooks import eval_mode, forward_hooks
from ..memory import default_budget
from .frontier import CheckpointSteps, Join, TracedGraph, Values, frontier_steps, servable_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _run_until(model: nn.Module, name: str, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """The input (or output) of layer `name` on `x`; the forward pass stops there."""
    got: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor | None = None):
        value = out if output else inputs[0]
        assert value is not None  # with `output`, a forward hook: it always receives the output
        got.append(value.detach())
        raise _Stop

    with forward_hooks(model, {name: hook}, pre=not output), torch.no_grad():
        try:
            model(x)
        except _Stop:
            pass
    if not got:
        raise UserError(f"layer {name!r} did not run in the forward pass; it cannot be reconstructed")
    return got[0]


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


def _norm_scale(norm: nn.Module | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """Per-channel slope of an eval-mode BatchNorm (ones without one). Shape: (n,)."""
    if norm is None:
        return torch.ones(n, dtype=like.dtype, device=like.device)
    # `residual_joins` names only BatchNorms with running statistics.
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None
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

    def reduce(self, group: ProcessGroup | None) -> None:
        """Sum the equations over the processes of `group`; every process must hold rows (calibrate checks
        that each has images)."""
        assert self.sums is not None, "reduce before any update"
        *self.sums, n = all_sum([*self.sums, torch.tensor([float(self.n)], dtype=torch.float64)], group)
        self.n = int(n[0])

    def solve(self, ridge: float, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """W (G, F, T), b (G, T) minimising Σ||x W + b - y||² + λ||W||² per group, and the fit's R²."""
        assert self.sums is not None, "solve before any update"
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


def _positions(seed: int, layer: int, first: int, b: int, per_image: int, limit: int, device: torch.device) -> torch.Tensor:
    """Flat indices into (b, per_image) of up to `limit` random positions of each of b images.

    Image i of the batch is image `first + i` of the calibration set: its positions are keyed by
    (seed, layer, that index), never by a generator's state, so they are the same however the images
    are batched or shared between processes. Shape: (b * min(limit, per_image),), sorted.
    """
    if per_image <= limit:
        return torch.arange(b * per_image, device=device)
    ids = torch.arange(first, first + b, device=device)[:, None]  # (b, 1)
    pos = torch.arange(per_image, device=device)  # (L,)
    keys = keyed(seed, layer, ids, pos) * per_image + pos  # (b, L), distinct within an image: no ties
    picked = torch.topk(keys, limit, dim=1, largest=False).indices.sort(dim=1).values  # (b, limit)
    return (picked + torch.arange(b, device=device)[:, None] * per_image).flatten()


def _conv_rows(m: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor, pos: torch.Tensor):
    """Regression rows of a convolution at the output positions `pos` (flat indices into (B, OH, OW)).

    Only the sampled patches are gathered (an unfold of the whole batch would cost B·L·P·K).
    Shape: x (G, N, F), y (G, N, T), one regression per group of the convolution: F = P/G·K inputs
    and T = Q/G outputs (G = 1 for a plain convolution; F = K and T = 1 for a depthwise one).
    """
    _, _, oh, ow = out.shape
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
    g = m.groups
    x = patches.unflatten(3, (g, -1)).permute(3, 0, 4, 1, 2).reshape(g, len(pos), -1)  # (G, N, P/G*K), unfold's order
    return x, target.unflatten(1, (g, -1)).transpose(0, 1)  # (G, N, Q/G)


@torch.no_grad()
def reconstruct(
    component: nn.Module,
    source: nn.Module,
    plan: Mapping[str, Mapping[str, Sequence[int]]],
    inputs: Sequence[torch.Tensor],
    *,
    ridge: float = 1e-3,
    rows_per_image: int = 32,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: bool = False,
    group: ProcessGroup | None = None,
) -> dict[str, float]:
    """Refit every Conv2d and Linear layer of `component` to reproduce `source`'s kept outputs (in place).

    Args:
        component: the component, cut from `source` with `plan`.
        source: the model it was cut from (not modified).
        plan: the pruning plan relative to `source` (`modellego.cut.prune.build_plan`).
        inputs: batches of TRAINING images of the task. Shape: (B, C, H, W) each.
        ridge: ridge strength relative to the mean feature variance.
        rows_per_image: regression rows (output positions) sampled per image and layer; bounds
            time and memory on large feature maps.
        seed: seed of that sampling, which is keyed by each image's index in `inputs` (so batching
            the images otherwise, or sharing them between processes, samples the same rows).
        memory_budget: bytes of every batch's live values that may be held between layers (one
            pass of each model); beyond it, the layers take one batch at a time, each model
            resuming from a checkpoint on disk (slower, same result; 0: from the first layer).
            Default: half the memory free on the batches' device when recon starts
            (`modellego.memory.default_budget`). The weights do not depend on it.
        progress: show a progress bar over the layers.
        group: a torch.distributed process group whose every process passes its own share of
            the images, a consecutive run of them in rank order (`modellego.core.distributed.batch_share`):
            each layer's normal equations are summed over the processes before the solve, so every
            process writes the weights of one process on all the images (up to summation order).

    Returns: the fraction of the target's variance explained (R²) per layer, after the refit.
    """
    modules, src_modules = dict(component.named_modules()), dict(source.named_modules())
    first = first_index(sum(len(x) for x in inputs), group)  # this share's first image in the whole set
    order = execution_order(component, inputs[0])
    for name in order:  # refuse before any layer changes, so a failure leaves the component as it was
        if name not in plan or name not in src_modules:
            raise UserError(f"cannot reconstruct {name!r}: the pruning plan or the source lacks it")
    comp_gm, src_gm = _traced(component, inputs[0]), _traced(source, inputs[0])
    joins: dict[str, Join] = {}
    if comp_gm is not None and src_gm is not None:
        src_nodes = {n.name for n in src_gm.graph.nodes}
        rank = {n: i for i, n in enumerate(order)}
        position = {n.name: i for i, n in enumerate(comp_gm.graph.nodes)}
        # Only an operand that is final when the layer is refitted can be compensated: a shortcut's
        # projection that runs after its branch is fitted last instead, against the refitted branch;
        # and only one computed before the layer runs (HRNet adds branches computed after it).
        joins = {k: j for k, j in residual_joins(comp_gm).items()
                 if {j.node, j.other} <= src_nodes and position[j.other] < position[j.node]
                 and all(rank.get(a, -1) < rank[k] for a in _layers_before(comp_gm, j.other))}
    if memory_budget is None:
        memory_budget = default_budget(inputs[0].device)
        log.debug("recon: holding at most %d bytes of the batches' values", memory_budget)
    elif memory_budget < 0:
        raise UserError(f"memory_budget must be a number of bytes >= 0, got {memory_budget}")
    traced = (TracedGraph(comp_gm), TracedGraph(src_gm)) if comp_gm is not None and src_gm is not None else None
    served = servable_layers(*traced, order, joins) if traced is not None else []
    r2: dict[str, float] = {}
    with eval_mode(component), eval_mode(source), contextlib.ExitStack() as stack:
        steps = frontier_steps(*traced, served, joins, inputs, memory_budget) if traced and served else None
        resumed: CheckpointSteps | None = None
        for ordinal, name in enumerate(tqdm(order, desc="recon", unit="layer", disable=None if progress else True)):
            join = joins.get(name)
            if steps is not None and name in steps.layers:
                values: Iterable[Values] = steps.values(name, join)
                if steps.nbytes() > memory_budget:
                    log.info("recon: the batches' values outgrow %d bytes at %s; the next layers resume the "
                             "models from checkpoints, one batch at a time", memory_budget, name)
                    steps = None
            elif name in served:
                if resumed is None:  # the checkpoints go to a private folder, removed however recon ends
                    assert traced is not None  # layers are served only from the traced graphs
                    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modellego-recon-")))
                    resumed = CheckpointSteps(*traced, served[served.index(name):], joins, inputs, root)
                values = resumed.values(name, join)
            else:  # one batch at a time, from passes that stop at the layer
                values = (_pass_values(name, join, component, source, (comp_gm, src_gm), x) for x in inputs)
            norm = modules[join.norm] if join is not None and join.norm else None
            layer = modules[name]
            assert isinstance(layer, (nn.Conv2d, nn.Linear))  # `execution_order` lists only these
            if transforms_weight(layer):  # its forward re-derives the filters (weight standardisation): left as cut
                log.debug("recon leaves %s as cut: it transforms its weight in the forward pass", name)
                continue
            rows = _Rows(seed, ordinal, first, rows_per_image)
            r2[name] = _refit(name, layer, plan, values, norm, rows, ridge=ridge, group=group)
    return r2


def _traced(model: nn.Module, example: torch.Tensor) -> fx.GraphModule | None:
    """The model traced by torch.fx, sharing its modules; None when it does not trace (no joins then)."""
    try:
        return trace_module(model, example[:2])
    except UnsupportedGraphError:  # reconstruction then fits every layer to its own output
        log.debug("%s does not trace; residual adds are not compensated", type(model).__name__)
        return None


def _pass_values(name: str, join: Join | None, component: nn.Module, source: nn.Module,
                 graphs: tuple[fx.GraphModule | None, fx.GraphModule | None], x: torch.Tensor) -> Values:
    """One batch's values for layer `name`, from forward passes that stop at the layer."""
    if join is None:
        return _run_until(component, name, x, output=False), _run_until(source, name, x, output=True), None, None
    # One pass of each model gives both the layer's values and the add's other operand.
    comp_gm, src_gm = graphs
    assert comp_gm is not None and src_gm is not None  # joins are found only when both models trace
    src = _node_values(src_gm, {join.node, join.other}, x)
    comp = _node_values(comp_gm, {join.input, join.other}, x, before=join.node)  # as the layer finds them
    return comp[join.input], src[join.node], src[join.other], comp[join.other]


class _Rows:
    """The rows one layer samples from consecutive batches of the calibration images."""

    def __init__(self, seed: int, layer: int, first: int, per_image: int) -> None:
        self.seed, self.layer, self.next, self.per_image = seed, layer, first, per_image

    def take(self, out: torch.Tensor) -> torch.Tensor:
        """Flat positions into `out`'s (B, positions) for its batch of B images. Shape: out (B, Q, ...)."""
        b = out.shape[0]
        pos = _positions(self.seed, self.layer, self.next, b, out[0, 0].numel(), self.per_image, out.device)
        self.next += b
        return pos


def _refit(name: str, m: nn.Conv2d | nn.Linear, plan: Mapping[str, Mapping[str, Sequence[int]]], values: Iterable[Values],
           norm: nn.Module | None, rows: _Rows, *, ridge: float, group: ProcessGroup | None = None) -> float:
    """Refit one layer of `component` in place (`norm`: the join's BatchNorm, if any); returns its R²."""
    out_idx = torch.as_tensor(list(plan[name]["out"]), dtype=torch.long)
    eqs = _Normal()
    for inp, source_out, other_src, other_comp in values:
        idx = out_idx.to(inp.device)
        target = source_out.index_select(1, idx)
        if other_src is not None:
            assert other_comp is not None  # a join's other operand comes from both models
            other_src = other_src.index_select(1, idx)
            if other_comp.shape == target.shape == other_src.shape:
                target = _absorb(target, other_src - other_comp, _norm_scale(norm, target.shape[1], target))
        if isinstance(m, nn.Conv2d):
            eqs.update(*_conv_rows(m, inp, target, rows.take(target)))
        else:  # features last: an image's positions are its rows
            pos = rows.take(target.movedim(-1, 1))
            xi, yi = inp.reshape(1, -1, inp.shape[-1]), target.reshape(1, -1, target.shape[-1])  # (1, N, P)
            eqs.update(xi[:, pos], yi[:, pos])
    if group is not None:
        eqs.reduce(group)
    w, b, fit = eqs.solve(ridge, intercept=m.bias is not None)
    _write(m, w, b)
    log.debug("reconstructed %s: R² %.4f over %d rows", name, fit, eqs.n)
    return round(fit, 4)


def _write(m: nn.Conv2d | nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Store solved weights. Shape: w (G, F, T), b (G, T), one regression per group."""
    weight = w.transpose(1, 2).reshape(m.weight.shape)  # (G, T, F) -> (Q, P/G, kh, kw) or (Q, P)
    bias = b.reshape(-1) if b is not None else None  # (Q,)
    m.weight.copy_(weight.to(m.weight))
    if bias is not None:
        assert m.bias is not None  # solved with an intercept only for a layer with a bias
        m.bias.copy_(bias.to(m.bias))
