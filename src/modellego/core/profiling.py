"""Profiling: relative contributions of selected samples, then per-class route maps (masks).

`profile(model, batches)` selects samples, runs one hooked forward pass over them per chunk of
classes, and locates every class's relevant channels. The result, a `Profile`, keeps per class and
per layer which inputs and outputs matter (the class's *route*), and saves/loads without pickle.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..hooks import forward_hooks
from ..io.info import class_names_of, get_info, weights_hash
from ..memory import default_budget, release_freed_memory
from . import distributed, kernels
from .contribution import KERNELS, LayerAccumulator, Workspace, class_slots, make_accumulator, relative
from .graph import ChannelGraph, Layer, trace
from .locate import Thresholds, Votes, group_sum, locate_rows
from .profile import Profile
from .samples import SampleSelection, SelectionConfig, every_sample, select_samples

log = logging.getLogger(__name__)


def check_kernel(kernel: str, device: torch.device) -> None:
    """Refuse, before any work, a contribution kernel that cannot run here."""
    if kernel not in KERNELS:
        raise UserError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "triton":
        kernels.require(device)


def contributions(
    model: nn.Module,
    graph: ChannelGraph,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: Sequence[int],
    *,
    mode: str = "sample",
    device: torch.device | None = None,
    kernel: str = "torch",
) -> dict[str, LayerAccumulator]:
    """Run `batches` through `model` once, accumulating per-class contribution sums per layer."""
    if mode not in ("sample", "mean"):
        raise UserError(f"mode must be 'sample' or 'mean', got {mode!r}")
    device = device or next(model.parameters()).device
    check_kernel(kernel, device)
    modules = dict(model.named_modules())
    workspace = Workspace()
    accs = {name: make_accumulator(modules[name], len(classes), mode, workspace, kernel) for name in graph.layers}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # The accumulator reduces x before returning, so later in-place ops cannot alter what it saw.
            accs[name].update(inputs[0], current["slots"])
        return hook

    n_out = graph.num_classes
    with forward_hooks(model, {name: hook_for(name) for name in graph.layers}), torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            keep, slots = class_slots(y, classes, n_out)
            if not bool(keep.all()):
                x = x[keep]  # samples of other classes never run
            if device.type == "cpu":
                # Class-sorted samples let every layer sum each class as one slice of its per-sample
                # contributions instead of a one-hot matmul, which broadcasts into many small ones.
                order = torch.argsort(slots, stable=True)
                x, slots = x[order], slots[order]
            current["slots"] = slots
            if len(slots):
                model(x)
    return accs


def profile(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    classes: Sequence[int] | None = None,
    thresholds: Thresholds | None = None,
    mode: str = "sample",
    select: bool | SelectionConfig = True,
    batch_size: int = 128,
    class_chunk: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    keep_contributions: bool = False,
    kernel: str = "torch",
    group: torch.distributed.ProcessGroup | None = None,
) -> Profile:
    """Profile `model`: select samples, accumulate relative contributions, locate every class.

    Args:
        model: a classifier whose forward pass torch.fx can trace.
        batches: iterable of (inputs, labels), normally the TRAINING split; read once (twice
            when the selection's candidates take more than its `hold_budget`).
        classes: output indices to profile (default: all).
        thresholds: α and β (default: the paper's).
        mode: "sample" (ReLU per sample, then sum) or "mean" (average features first).
        select: how samples are selected: ``True`` the paper's top 1% of correct samples per
            class (`SelectionConfig()`), a `SelectionConfig`, or ``False`` for every sample given.
        batch_size: batch size of the contribution pass.
        class_chunk: classes accumulated at once (default: as many as fit `memory_budget`).
        memory_budget: bytes of contribution sums to hold at once when choosing `class_chunk`
            (default: half the memory free on `device` when profiling starts,
            `modellego.memory.default_budget`). The profile does not depend on it.
        device: where to run (default: where the model's parameters are).
        progress: show progress bars (over the selection pass's batches, then over the classes).
        keep_contributions: keep every class's relative contributions in the profile (one
            float per weight and class: 4 bytes × parameters × classes), so it can be located
            again without profiling (`modellego.disassemble(..., flops=...)` needs them).
        kernel: ``"torch"`` (any device) or ``"triton"`` (a fused kernel for the per-sample
            contributions of convolutions, on a CUDA device with Triton; `modellego.core.kernels`).
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD`` under
            torchrun) whose every process calls this with the same model and arguments and its
            own shard of `batches`; every process then returns the profile of all shards
            together (`modellego.core.distributed`).
    """
    thresholds = thresholds or Thresholds()
    selection = SelectionConfig() if select is True else select or None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_kernel(kernel, device)  # before the selection pass, so a bad choice costs nothing
    if memory_budget is not None and memory_budget < 0:
        raise UserError(f"memory_budget must be a number of bytes >= 0, got {memory_budget}")
    if class_chunk is not None and class_chunk < 1:
        raise UserError(f"class_chunk must be at least 1, got {class_chunk}")
    rank, processes = distributed.world(group)
    model_sha256 = weights_hash(model.state_dict())
    if group is not None:  # what steers the collectives below must match, or they would hang
        distributed.agree({"the model's weights (sha256)": model_sha256,
                           "classes": None if classes is None else [int(c) for c in classes],
                           "select": selection is not None, **(selection.to_json() if selection else {}), "mode": mode,
                           "thresholds": thresholds.to_json()}, group)
    t0 = time.perf_counter()
    if selection is not None:
        sel = select_samples(model, batches, classes=classes, fraction=selection.fraction,
                             min_per_class=selection.min_per_class, max_per_class=selection.max_per_class,
                             device=device, group=group, progress=progress, hold_budget=selection.hold_budget)
    else:
        sel = every_sample(batches, group=group)
    t_select = time.perf_counter() - t0
    assert sel.example is not None  # both refuse empty data
    example = sel.example.to(device)
    graph = trace(model, example)
    classes = _checked_classes(classes, graph.num_classes)
    for c in classes:
        sel.selected.setdefault(c, 0)
    class_chunk = _class_chunk(graph, example, len(classes), class_chunk, memory_budget, device, group)
    t1 = time.perf_counter()
    masks = _locate_all(model, graph, sel, classes, thresholds, class_chunk, batch_size=batch_size, mode=mode,
                        device=device, kernel=kernel, group=group, keep_contributions=keep_contributions,
                        progress=progress and rank == 0)
    info = get_info(model)
    provenance = {
        "model_sha256": model_sha256,
        "arch": info.arch if info else type(model).__name__,
        "input_shape": list(example.shape[1:]),
        "processes": processes,
        "mode": mode,
        "kernel": kernel,
        "selection": {**(selection or SelectionConfig()).to_json(), "enabled": selection is not None,
                      **{k: {str(c): n for c, n in v.items()} for k, v in sel.summary().items() if isinstance(v, dict)}},
        "short": list(sel.short),
        "missing": [c for c in classes if sel.selected.get(c, 0) == 0],
        "seconds": {"select": round(t_select, 3), "contributions_and_locating": round(time.perf_counter() - t1, 3)},
        "torch_version": torch.__version__,
    }
    names = class_names_of(model, graph.num_classes)
    in_masks, out_masks, kept_r = masks
    return Profile(tuple(classes), tuple(names[c] for c in classes), in_masks, out_masks, thresholds, provenance,
                   kept_r if keep_contributions else None)


def _checked_classes(classes: Sequence[int] | None, n_out: int) -> list[int]:
    out = list(range(n_out)) if classes is None else [int(c) for c in classes]
    if not out:
        raise UserError("no classes to profile")
    bad = [c for c in out if not 0 <= c < n_out]
    if bad:
        raise UserError(f"classes {bad} are out of range for a model with {n_out} outputs")
    return out


def _class_chunk(graph: ChannelGraph, example: torch.Tensor, n_classes: int, class_chunk: int | None,
                 memory_budget: int | None, device: torch.device, group: torch.distributed.ProcessGroup | None) -> int:
    """Classes accumulated at once: as many as `memory_budget` holds, agreed by every process."""
    # One class's sums: a float per filter and input channel, in the dtype the layers see (the input's).
    per_class_bytes = example.element_size() * sum(
        ly.out_features * ly.in_features // (ly.module.groups if isinstance(ly.module, nn.Conv2d) else 1)
        for ly in graph.layers.values())
    if class_chunk is None:
        if memory_budget is None:  # read after the selection pass, which has let go of its batches
            memory_budget = default_budget(device)
        class_chunk = max(1, min(n_classes, memory_budget // max(per_class_bytes, 1)))
        log.debug("profiling %d classes at a time (%d bytes of sums each, budget %d bytes)",
                  class_chunk, per_class_bytes, memory_budget)
    if group is not None:  # the smallest chunk of all processes: their all-reduces must pair up
        class_chunk = min(cast(list[int], distributed.gather(class_chunk, group)))
    return class_chunk


Masks = dict[str, torch.Tensor]


def _votes(layer: Layer, acc: LayerAccumulator, thresholds: Thresholds) -> Votes:
    """Eq. 6 counts of `layer` for a chunk's classes (row b: class slot b), Shapes (B, Q) bool -> (B, P)."""
    alpha = thresholds.for_layer(layer)[0]

    def votes(out_mask: torch.Tensor) -> torch.Tensor:
        rows = []
        for slot, gate in enumerate(out_mask):
            r = relative(acc.s_hat(slot))  # (Q, P // groups), Eq. 5
            hits = (r >= alpha) & gate.to(r.device)[:, None]  # Eq. 9 with Appendix C's output gating
            rows.append(group_sum(hits, layer.groups).cpu())  # (P,)
        return torch.stack(rows)

    return votes


def _locate_all(model: nn.Module, graph: ChannelGraph, sel: SampleSelection, classes: list[int],
                thresholds: Thresholds, class_chunk: int, *, batch_size: int, mode: str, device: torch.device,
                kernel: str, group: torch.distributed.ProcessGroup | None, keep_contributions: bool,
                progress: bool) -> tuple[Masks, Masks, Masks]:
    """Contributions of `class_chunk` classes at a time, each class located at once.

    Returns: per layer, stacked over `classes`: in-masks, out-masks, and (when kept) the
    relative contributions.
    """
    in_masks: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    out_masks: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    kept_r: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    with tqdm(total=len(classes), desc="profiling classes", unit="class", disable=None if progress else True) as bar:
        for i in range(0, len(classes), class_chunk):
            part = classes[i: i + class_chunk]
            accs = contributions(model, graph, sel.batches(batch_size, part), part, mode=mode, device=device,
                                 kernel=kernel)
            if group is not None:
                distributed.sum_accumulators(accs, group)
            # One walk for the chunk's classes, row by row (`locate_rows`): each layer's votes are
            # computed class by class from its sums, so only one class's contributions are live.
            votes = {name: _votes(graph.layers[name], acc, thresholds) for name, acc in accs.items()}
            ins, outs = locate_rows(graph, votes, torch.as_tensor(part), thresholds)
            for slot in range(len(part)):
                for k in graph.layers:
                    in_masks[k].append(ins[k][slot])
                    out_masks[k].append(outs[k][slot])
                    if keep_contributions:  # native dtype: relocating reproduces the masks exactly
                        kept_r[k].append(relative(accs[k].s_hat(slot)).cpu())
            bar.update(len(part))
            del accs
            release_freed_memory()  # the chunk's per-class temporaries, or the heap grows class after class
    return ({k: torch.stack(v) for k, v in in_masks.items()}, {k: torch.stack(v) for k, v in out_masks.items()},
            {k: torch.stack(v) for k, v in kept_r.items()} if keep_contributions else {})
