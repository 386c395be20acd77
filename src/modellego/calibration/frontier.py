"""Recon's two traced models, run side by side over the calibration batches.

`modellego.calibration.reconstruct` refits a component's layers first to last. For every batch, each layer
needs its input in the component (every earlier layer already refitted) and its output in the
source; a layer that feeds a residual add also needs the add's other operand in both models.
Two ways here give them, with bit-identical values:

- `FrontierSteps`: both models advance node by node, all batches in step, holding every batch's
  live values (the *frontier*) between layers. One forward pass of each model in all; memory for
  every batch's live values.
- `CheckpointSteps`: one batch at a time, each model resumes from its last *cut* before the
  layer: a node whose value is then the only one live (a block's output, say), saved to disk
  when a run first passes it if a later layer will resume there (`TracedGraph` finds the cuts
  before anything runs). Memory for one batch and one value per cut on disk; each layer re-runs
  only the nodes since its cut.

`servable_layers` says which layers either can serve; the rest take passes that stop at the
layer (`modellego.calibration.reconstruct`).
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Join:
    """A layer whose output reaches a residual add through at most one BatchNorm."""

    node: str  # the fx node of the layer's call
    input: str  # the fx node of its input
    other: str  # the fx node of the add's other operand
    norm: str | None  # the BatchNorm module between the layer and the add

# Per batch: the layer's input in the component, the source's value that the target is made
# from (the layer's output), and for a join the add's other operand in the source and component.
Values = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]

INPUT = -1  # the cut before the first node: the batch itself


class TracedGraph:
    """One traced model's nodes in run order, with what every run over them looks up, built once
    and shared by all of them."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.calls: dict[str, str] = {}  # module name -> the node of its first call
        for node in self.nodes:
            if node.op == "call_module" and node.target not in self.calls:
                self.calls[node.target] = node.name
        # node -> the values it reads last, freed once it has run (as `fx.Interpreter.run` frees them)
        self.last_uses: dict[fx.Node, list[fx.Node]] = fx.Interpreter(gm).user_to_last_uses
        # The cuts: indices after which the node's own value is the only one live, so a run can
        # resume there from that value alone. A placeholder's value is the batch itself (INPUT).
        live: set[fx.Node] = set()
        self.cuts: list[int] = []
        for i, node in enumerate(self.nodes):
            live.add(node)
            live.difference_update(self.last_uses.get(node, ()))
            if len(live) == 1 and node.op != "placeholder":
                self.cuts.append(i)

    def last_cut(self, bound: int) -> int:
        """The last cut at or before node index `bound` (INPUT if none)."""
        return self.cuts[i - 1] if (i := bisect.bisect_right(self.cuts, bound)) else INPUT


class Frontier:
    """Live values of one traced model over some batches, advanced node by node, batches in step.

    Values are freed after their last use, as `fx.Interpreter.run` frees them; nodes in `keep` are
    also held (by reference, not copied) until `take` has read them `keep[name]` times. A read
    thus sees the value as the forward pass has it at the cursor, in-place changes included, as
    a pass that stops there does.

    A frontier starts from the batches (`start=INPUT`) or from a cut: the node at index `start`
    has run, and `inputs` are its values. `cuts`, when given, receives each cut the batches pass.
    """

    def __init__(self, graph: TracedGraph, inputs: Sequence[torch.Tensor], keep: Mapping[str, int], *,
                 start: int = INPUT, cuts: Checkpoints | None = None, batches: Sequence[int] = ()) -> None:
        self.graph = graph
        self.runs = []
        for x in inputs:
            run = fx.Interpreter(graph.gm, garbage_collect_values=False)  # `advance` frees, by `graph.last_uses`
            if start == INPUT:
                run.args_iter = iter([x])
            else:
                run.env[graph.nodes[start]] = x
            self.runs.append(run)
        self.cursor = start + 1  # index of the next node to run
        self.reads = dict(keep)
        self.kept: list[dict[str, torch.Tensor]] = [{} for _ in inputs]
        if start != INPUT and graph.nodes[start].name in self.reads:  # a value read is the cut itself
            for kept, x in zip(self.kept, inputs):
                kept[graph.nodes[start].name] = x
        self.cuts, self.batches = cuts, list(batches)

    def advance(self, stop: int) -> None:
        """Run every node before index `stop` (no-op when already past it)."""
        for i in range(self.cursor, stop):
            node = self.graph.nodes[i]
            for b, (run, kept) in enumerate(zip(self.runs, self.kept)):
                out = run.env[node] = run.run_node(node)
                if node.name in self.reads:
                    kept[node.name] = out.detach()
                for dead in self.graph.last_uses.get(node, ()):
                    del run.env[dead]
                if self.cuts is not None and len(run.env) == 1 and isinstance(out, torch.Tensor):
                    self.cuts.save(i, self.batches[b], out)  # everything after reads only `out`
        self.cursor = max(self.cursor, stop)

    def current(self, name: str) -> list[torch.Tensor]:
        """The live value of node `name` in every batch, as the next node would read it."""
        node = self.graph.nodes[self.graph.index[name]]
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


class Checkpoints:
    """One model's values at the cuts its runs passed: one safetensors file per cut and batch, in
    `root` (a private temporary folder). Only the cuts in `wanted` are written: the ones a later
    run will resume from. A value keeps its memory layout (contiguous or channels-last), so
    resuming computes exactly what the uninterrupted run computes; a cut in any other layout is
    not saved."""

    def __init__(self, root: Path, inputs: Sequence[torch.Tensor], wanted: Iterable[int]) -> None:
        root.mkdir()
        self.root, self.inputs, self.wanted = root, inputs, frozenset(wanted)
        self.saved: dict[int, set[int]] = {}  # cut index -> batches saved

    def _path(self, index: int, batch: int) -> Path:
        return self.root / f"{index}-{batch}.safetensors"

    def save(self, index: int, batch: int, value: torch.Tensor) -> None:
        if index not in self.wanted or batch in self.saved.get(index, ()):
            return
        if value.is_contiguous():
            layout = "contiguous"
        elif value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
            layout = "channels_last"
        else:
            return
        save_file({"value": value.detach().contiguous().cpu()}, self._path(index, batch), metadata={"layout": layout})
        self.saved.setdefault(index, set()).add(batch)

    def best(self, bound: int) -> int:
        """The last cut at or before node index `bound` that every batch has saved (INPUT if none)."""
        full = [i for i, done in self.saved.items() if i <= bound and len(done) == len(self.inputs)]
        return max(full, default=INPUT)

    def load(self, index: int, batch: int) -> torch.Tensor:
        x = self.inputs[batch]
        if index == INPUT:
            return x
        with safe_open(self._path(index, batch), "pt", device=str(x.device)) as f:
            layout, value = f.metadata()["layout"], f.get_tensor("value")
        # A fresh copy, aligned as PyTorch aligns what it allocates: a read straight from the file
        # may sit anywhere, and a CPU matmul on unaligned data can round differently.
        return value.clone(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    def forget_before(self, bound: int) -> None:
        """Delete the cuts that `best` can no longer return for any bound at or after `bound`."""
        last = self.best(bound)
        for index in [i for i in self.saved if i < last]:
            for batch in self.saved.pop(index):
                self._path(index, batch).unlink()


def source_needs(call: str, join: Join | None) -> list[str]:
    """The source nodes a layer reads: its output (node `call`), and a join's other operand."""
    return [call] + ([join.other] if join is not None else [])


def source_stop(index: Mapping[str, int], call: str, join: Join | None) -> int:
    """Index of the source node after the last one that `source_needs` names."""
    return max(index[n] for n in source_needs(call, join)) + 1


class FrontierSteps:
    """Both models' frontiers over all batches, advanced to each layer in turn."""

    def __init__(self, comp: Frontier, src: Frontier, layers: set[str]) -> None:
        self.comp, self.src, self.layers = comp, src, layers

    def values(self, name: str, join: Join | None) -> list[Values]:
        """Every batch's values for layer `name`. The component stops just before the layer runs,
        the source just after the last value needed, where the per-layer passes stop too."""
        comp, src = self.comp.graph, self.src.graph
        comp_call, src_call = comp.calls[name], src.calls[name]
        self.comp.advance(comp.index[comp_call])
        stop = source_stop(src.index, src_call, join)
        assert self.src.cursor <= stop, (name, self.src.cursor, stop)  # `servable_layers` allows no other
        self.src.advance(stop)
        inp = self.comp.current(comp.nodes[comp.index[comp_call]].args[0].name)
        target = self.src.take(src_call)
        if join is None:
            return [(i, t, None, None) for i, t in zip(inp, target)]
        return list(zip(inp, target, self.src.take(join.other), self.comp.current(join.other)))

    def nbytes(self) -> int:
        return self.comp.nbytes() + self.src.nbytes()


def servable_layers(comp: TracedGraph, src: TracedGraph, order: Sequence[str], joins: Mapping[str, Join]) -> list[str]:
    """The layers of `order` (refitted in that order) whose values a run of both graphs, node by
    node, can give at the point where a pass that stops at the layer would read them."""
    layers: list[str] = []
    last, src_last = -1, -1
    for name in order:
        # The component stops just before each layer runs, in graph order. A layer that is not a
        # node of its own, or runs out of that order, may already have run with its old weights:
        # from there on, every layer takes passes.
        if name not in comp.calls or name not in src.calls or comp.index[comp.calls[name]] < last:
            break
        at = comp.index[comp.calls[name]]
        call, join = comp.nodes[at], joins.get(name)
        # An input that is not a node, an add operand computed after the layer, or source values
        # that an earlier layer's reads already ran past (in-place ops may have changed them since):
        # this layer takes passes; the runs pass it only after its refit.
        stop = source_stop(src.index, src.calls[name], join)
        if not call.args or not isinstance(call.args[0], fx.Node) or stop < src_last or (
                join is not None and comp.index.get(join.other, len(comp.nodes)) > at):
            continue
        layers.append(name)
        last, src_last = at, stop
    return layers


def _keep(src: TracedGraph, joins: Mapping[str, Join], layers: Sequence[str]) -> dict[str, int]:
    """How often the steps for `layers` read each source node."""
    return dict(Counter(n for name in layers for n in source_needs(src.calls[name], joins.get(name))))


def frontier_steps(comp: TracedGraph, src: TracedGraph, layers: Sequence[str], joins: Mapping[str, Join],
                   inputs: Sequence[torch.Tensor], memory_budget: int) -> FrontierSteps | None:
    """The frontiers for the first of `layers` that they can serve within `memory_budget` bytes;
    None when the first would not fit."""

    def steps(batches: Sequence[torch.Tensor], served: Sequence[str]) -> FrontierSteps:
        return FrontierSteps(Frontier(comp, batches, {}), Frontier(src, batches, _keep(src, joins, served)),
                             set(served))

    # Sizes scale with the number of images: one image through the same steps predicts them, so
    # the frontier stops before the layer where it would outgrow the budget, not after.
    probe, images = steps([inputs[0][:1].clone()], layers), sum(len(x) for x in inputs)  # own storage
    for i, name in enumerate(layers):
        probe.values(name, joins.get(name))
        if probe.nbytes() * images > memory_budget:
            log.info("recon: the batches' values would outgrow %d bytes at %s; it and the next layers resume "
                     "the models from checkpoints, one batch at a time", memory_budget, name)
            layers = layers[:i]
            break
    return steps(inputs, layers) if layers else None


class CheckpointSteps:
    """Each layer's values one batch at a time, from runs of both models that resume at their last
    cut before the layer (saved under `root`, deleted as later layers stop needing them)."""

    def __init__(self, comp: TracedGraph, src: TracedGraph, layers: Sequence[str], joins: Mapping[str, Join],
                 inputs: Sequence[torch.Tensor], root: Path) -> None:
        self.graphs, self.joins, self.inputs, self.layers = (comp, src), joins, inputs, list(layers)
        # A run may resume from a cut before the component's layer (the layer itself must run
        # with its new weights) and at or before the first source value read (later ones are
        # no longer held at the cut). The runs stop where the frontiers do.
        needs = {name: [src.index[n] for n in source_needs(src.calls[name], joins.get(name))] for name in layers}
        self.bounds = {name: (comp.index[comp.calls[name]] - 1, min(needs[name])) for name in layers}
        stops = [(comp.index[comp.calls[name]], max(needs[name]) + 1) for name in layers]
        # Where each run will resume: the last cut at or before its bound that the earlier runs
        # passed (together they pass every node before the furthest stop so far). Only these are
        # written; a cut the runs pass on their way to a later one would never be read.
        wanted: tuple[set[int], set[int]] = (set(), set())
        reach = [0, 0]
        for name, stop in zip(layers, stops):
            for k, graph in enumerate(self.graphs):
                wanted[k].add(graph.last_cut(min(self.bounds[name][k], reach[k] - 1)))
                reach[k] = max(reach[k], stop[k])
        self.cuts = tuple(Checkpoints(root / part, inputs, want - {INPUT})
                          for part, want in zip(("component", "source"), wanted))

    def values(self, name: str, join: Join | None) -> Iterator[Values]:
        """Every batch's values for layer `name`, one batch at a time."""
        bounds = self.bounds[name]
        starts = [cuts.best(bound) for cuts, bound in zip(self.cuts, bounds)]
        keep = _keep(self.graphs[1], self.joins, [name])
        for b in range(len(self.inputs)):
            comp, src = (Frontier(graph, [cuts.load(start, b)], reads, start=start, cuts=cuts, batches=[b])
                         for graph, cuts, start, reads in zip(self.graphs, self.cuts, starts, ({}, keep)))
            yield FrontierSteps(comp, src, {name}).values(name, join)[0]
        rest = self.layers[self.layers.index(name) + 1:]
        for k, cuts in enumerate(self.cuts):
            cuts.forget_before(min((self.bounds[r][k] for r in rest), default=INPUT))
