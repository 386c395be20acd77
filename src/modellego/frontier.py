"""Recon's two traced models, run side by side over the calibration batches.

`modellego.reconstruct` refits a component's layers first to last. For every batch, each layer
needs its input in the component (every earlier layer already refitted) and its output in the
source; a layer that feeds a residual add also needs the add's other operand in both models.
Two ways here give them, with bit-identical values:

- `FrontierSteps`: both models advance node by node, all batches in step, holding every batch's
  live values (the *frontier*) between layers. One forward pass of each model in all; memory for
  every batch's live values.
- `CheckpointSteps`: one batch at a time, each model resumes from its last *cut* before the
  layer: a node whose value is then the only one live (a block's output, say), saved to disk
  when a run first passed it. Memory for one batch and one value per cut on disk; each layer
  re-runs only the nodes since its cut.

`servable_layers` says which layers either can serve; the rest take passes that stop at the
layer (`modellego.reconstruct`).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .reconstruct import Join

log = logging.getLogger(__name__)

# Per batch: the layer's input in the component, the source's value that the target is made
# from (the layer's output), and for a join the add's other operand in the source and component.
Values = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]

INPUT = -1  # the cut before the first node: the batch itself


class Frontier:
    """Live values of one traced model over some batches, advanced node by node, batches in step.

    Values are freed after their last use, as `fx.Interpreter.run` frees them; nodes in `keep` are
    also held (by reference, not copied) until `take` has read them `keep[name]` times. A read
    thus sees the value as the forward pass has it at the cursor, in-place changes included, as
    a pass that stops there does.

    A frontier starts from the batches (`start=INPUT`) or from a cut: the node at index `start`
    has run, and `inputs` are its values. `cuts`, when given, receives each cut the batches pass.
    """

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor], keep: Mapping[str, int], *,
                 start: int = INPUT, cuts: Checkpoints | None = None, batches: Sequence[int] = ()) -> None:
        self.nodes = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.runs = []
        for x in inputs:
            run = fx.Interpreter(gm)
            if start == INPUT:
                run.args_iter = iter([x])
            else:
                run.env[self.nodes[start]] = x
            self.runs.append(run)
        self.cursor = start + 1  # index of the next node to run
        self.reads = dict(keep)
        self.kept: list[dict[str, torch.Tensor]] = [{} for _ in inputs]
        if start != INPUT and self.nodes[start].name in self.reads:  # a value read is the cut itself
            for kept, x in zip(self.kept, inputs):
                kept[self.nodes[start].name] = x
        self.cuts, self.batches = cuts, list(batches)

    def advance(self, stop: int) -> None:
        """Run every node before index `stop` (no-op when already past it)."""
        for i in range(self.cursor, stop):
            node = self.nodes[i]
            for b, (run, kept) in enumerate(zip(self.runs, self.kept)):
                out = run.env[node] = run.run_node(node)
                if node.name in self.reads:
                    kept[node.name] = out.detach()
                for dead in run.user_to_last_uses.get(node, ()):
                    del run.env[dead]
                if self.cuts is not None and len(run.env) == 1 and isinstance(out, torch.Tensor):
                    self.cuts.save(i, self.batches[b], out)  # everything after reads only `out`
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


class Checkpoints:
    """One model's values at the cuts its runs passed: one safetensors file per cut and batch, in
    `root` (a private temporary folder). A value keeps its memory layout (contiguous or
    channels-last), so resuming computes exactly what the uninterrupted run computes; a cut in
    any other layout is not saved."""

    def __init__(self, root: Path, inputs: Sequence[torch.Tensor]) -> None:
        root.mkdir()
        self.root, self.inputs = root, inputs
        self.saved: dict[int, set[int]] = {}  # cut index -> batches saved

    def _path(self, index: int, batch: int) -> Path:
        return self.root / f"{index}-{batch}.safetensors"

    def save(self, index: int, batch: int, value: torch.Tensor) -> None:
        if batch in self.saved.get(index, ()):
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


def first_calls(gm: fx.GraphModule) -> dict[str, str]:
    """Module name -> the node of its first call."""
    calls: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in calls:
            calls[node.target] = node.name
    return calls


class FrontierSteps:
    """Both models' frontiers over all batches, advanced to each layer in turn."""

    def __init__(self, comp: Frontier, src: Frontier, calls: tuple[dict[str, str], dict[str, str]],
                 layers: set[str]) -> None:
        self.comp, self.src, self.calls, self.layers = comp, src, calls, layers

    def values(self, name: str, join: Join | None) -> list[Values]:
        """Every batch's values for layer `name`. The component stops just before the layer runs,
        the source just after the last value needed, where the per-layer passes stop too."""
        comp_call, src_call = self.calls[0][name], self.calls[1][name]
        self.comp.advance(self.comp.index[comp_call])
        stop = source_stop(self.src.index, src_call, join)
        assert self.src.cursor <= stop, (name, self.src.cursor, stop)  # `servable_layers` allows no other
        self.src.advance(stop)
        call = self.comp.nodes[self.comp.index[comp_call]]
        inp = self.comp.current(call.args[0].name)
        target = self.src.take(src_call)
        if join is None:
            return [(i, t, None, None) for i, t in zip(inp, target)]
        return list(zip(inp, target, self.src.take(join.other), self.comp.current(join.other)))

    def nbytes(self) -> int:
        return self.comp.nbytes() + self.src.nbytes()


def servable_layers(comp_gm: fx.GraphModule, src_gm: fx.GraphModule, order: Sequence[str],
                    joins: Mapping[str, Join]) -> list[str]:
    """The layers of `order` (refitted in that order) whose values a run of both graphs, node by
    node, can give at the point where a pass that stops at the layer would read them."""
    comp_calls, src_calls = first_calls(comp_gm), first_calls(src_gm)
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
        # this layer takes passes; the runs pass it only after its refit.
        stop = source_stop(src_index, src_calls[name], join)
        if not call.args or not isinstance(call.args[0], fx.Node) or stop < src_last or (
                join is not None and comp_nodes.get(join.other, (len(comp_nodes),))[0] > at):
            continue
        layers.append(name)
        last, src_last = at, stop
    return layers


def _keep(src_calls: Mapping[str, str], joins: Mapping[str, Join], layers: Sequence[str]) -> dict[str, int]:
    """How often the steps for `layers` read each source node."""
    return dict(Counter(n for name in layers for n in source_needs(src_calls[name], joins.get(name))))


def frontier_steps(comp_gm: fx.GraphModule, src_gm: fx.GraphModule, layers: Sequence[str],
                   joins: Mapping[str, Join], inputs: Sequence[torch.Tensor], memory_budget: int) -> FrontierSteps | None:
    """The frontiers for the first of `layers` that they can serve within `memory_budget` bytes;
    None when the first would not fit."""
    calls = first_calls(comp_gm), first_calls(src_gm)

    def steps(batches: Sequence[torch.Tensor], served: Sequence[str]) -> FrontierSteps:
        return FrontierSteps(Frontier(comp_gm, batches, {}), Frontier(src_gm, batches, _keep(calls[1], joins, served)),
                             calls, set(served))

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

    def __init__(self, comp_gm: fx.GraphModule, src_gm: fx.GraphModule, layers: Sequence[str],
                 joins: Mapping[str, Join], inputs: Sequence[torch.Tensor], root: Path) -> None:
        self.gms, self.joins, self.inputs = (comp_gm, src_gm), joins, inputs
        self.calls = first_calls(comp_gm), first_calls(src_gm)
        self.cuts = Checkpoints(root / "component", inputs), Checkpoints(root / "source", inputs)
        comp_index = {n.name: i for i, n in enumerate(comp_gm.graph.nodes)}
        src_index = {n.name: i for i, n in enumerate(src_gm.graph.nodes)}
        # A run may resume from a cut before the component's layer (the layer itself must run
        # with its new weights) and at or before the first source value read (later ones are
        # no longer held at the cut).
        self.bounds = {name: (comp_index[self.calls[0][name]] - 1,
                              min(src_index[n] for n in source_needs(self.calls[1][name], joins.get(name))))
                       for name in layers}
        self.layers = list(layers)

    def values(self, name: str, join: Join | None) -> Iterator[Values]:
        """Every batch's values for layer `name`, one batch at a time."""
        bounds = self.bounds[name]
        starts = [cuts.best(bound) for cuts, bound in zip(self.cuts, bounds)]
        keep = _keep(self.calls[1], self.joins, [name])
        for b in range(len(self.inputs)):
            comp, src = (Frontier(gm, [cuts.load(start, b)], reads, start=start, cuts=cuts, batches=[b])
                         for gm, cuts, start, reads in zip(self.gms, self.cuts, starts, ({}, keep)))
            yield FrontierSteps(comp, src, self.calls, {name}).values(name, join)[0]
        rest = self.layers[self.layers.index(name) + 1:]
        for k, cuts in enumerate(self.cuts):
            cuts.forget_before(min((self.bounds[r][k] for r in rest), default=INPUT))
