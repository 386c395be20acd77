"""Profiling: relative contributions of selected samples, then per-class route maps (masks).

`profile(model, batches)` selects samples, runs one hooked forward pass over them per chunk of
classes, and locates every class's relevant channels. The result, a `Profile`, keeps per class and
per layer which inputs and outputs matter (the class's *route*), and saves/loads without pickle.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__, distributed, kernels
from ._io import atomic_path
from .checkpoint import weights_hash
from .contribution import KERNELS, LayerAccumulator, Workspace, class_slots, relative
from .errors import CorruptFileError, UserError
from .graph import ChannelGraph, trace
from .hooks import forward_hooks
from .info import get_info
from .locate import Thresholds, locate_class
from .memory import default_budget
from .samples import every_sample, select_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """Per-class route map of a model: relevant inputs/outputs of every Conv2d and Linear layer.

    Attributes:
        classes: profiled output indices.
        class_names: their names.
        in_masks: per layer, Shape (len(classes), P) bool.
        out_masks: per layer, Shape (len(classes), Q) bool.
        thresholds: α and β used.
        provenance: model hash, input shape, mode, samples per class, timings.
        contributions: per layer, the relative contributions r (Eq. 5) the masks came from,
            Shape (len(classes), Q, P // groups); kept only on request (``keep_contributions``),
            so that channels can be located again, e.g. under a FLOPs budget, without profiling.
    """

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    in_masks: dict[str, torch.Tensor]
    out_masks: dict[str, torch.Tensor]
    thresholds: Thresholds
    provenance: dict[str, Any] = field(default_factory=dict)
    contributions: dict[str, torch.Tensor] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.in_masks)

    @property
    def model_sha256(self) -> str | None:
        return self.provenance.get("model_sha256")

    def rows(self, classes: Sequence[int]) -> list[int]:
        """Row of each class in the masks; a clear error for classes not profiled or without samples."""
        pos = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in classes if c not in pos]
        if unknown:
            raise UserError(f"classes {unknown} were not profiled (profiled: {list(self.classes)})")
        empty = [c for c in classes if c in set(self.provenance.get("missing", []))]
        if empty:
            names = ", ".join(repr(self.class_names[pos[c]]) for c in empty)
            raise UserError(f"class {names} had no correctly classified training sample, so it has no route; "
                            "profile with more data or a better model")
        return [pos[c] for c in classes]

    def task_in_masks(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """Union over `classes` of the relevant inputs of every layer."""
        rows = self.rows(classes)
        return {k: v[rows].any(0) for k, v in self.in_masks.items()}

    def task_out_masks(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.rows(classes)
        return {k: v[rows].any(0) for k, v in self.out_masks.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile (safetensors masks + JSON header) atomically."""
        path = Path(path)
        tensors = {f"in/{k}": v.to(torch.uint8).contiguous() for k, v in self.in_masks.items()}
        tensors |= {f"out/{k}": v.to(torch.uint8).contiguous() for k, v in self.out_masks.items()}
        tensors |= {f"r/{k}": v.contiguous() for k, v in (self.contributions or {}).items()}
        header = {
            "format": "modellego-profile", "format_version": 1, "library_version": __version__,
            "classes": list(self.classes), "class_names": list(self.class_names),
            "layers": self.layers, "thresholds": self.thresholds.to_json(), "provenance": self.provenance,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"modellego-profile": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        path = Path(path)
        if not path.exists():
            raise UserError(f"no profile at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("modellego-profile")
                if meta is None:
                    raise CorruptFileError(f"{path} is not a modellego profile")
                header = json.loads(meta)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise CorruptFileError(f"{path} is not a readable profile ({e})") from e
        try:
            n = len(header["classes"])
            in_masks = {k: tensors[f"in/{k}"].bool() for k in header["layers"]}
            out_masks = {k: tensors[f"out/{k}"].bool() for k in header["layers"]}
            if any(v.ndim != 2 or v.shape[0] != n for v in [*in_masks.values(), *out_masks.values()]):
                raise ValueError("mask shapes do not match the class count")
            contributions = None
            if any(k.startswith("r/") for k in tensors):
                contributions = {k: tensors[f"r/{k}"] for k in header["layers"]}
                for k, r in contributions.items():
                    want = (n, out_masks[k].shape[1])
                    if (r.ndim != 3 or tuple(r.shape[:2]) != want or not r.is_floating_point()
                            or in_masks[k].shape[1] % max(r.shape[2], 1)):
                        raise ValueError(f"contributions of {k} have shape {tuple(r.shape)}, expected {want} + (P,)")
            return cls(tuple(header["classes"]), tuple(header["class_names"]), in_masks, out_masks,
                       Thresholds(**header["thresholds"]), header.get("provenance", {}), contributions)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: malformed profile ({e})") from e


def class_names_of(model: nn.Module, num_classes: int) -> list[str]:
    info = get_info(model)
    return list(info.class_names) if info else [str(i) for i in range(num_classes)]


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
    accs = {name: LayerAccumulator(modules[name], len(classes), mode, workspace, kernel) for name in graph.layers}
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
    select: bool = True,
    fraction: float = 0.01,
    min_per_class: int = 5,
    max_per_class: int = 256,
    hold_budget: int | None = None,
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
            when the selection's candidates take more than `hold_budget`).
        classes: output indices to profile (default: all).
        thresholds: α and β (default: the paper's).
        mode: "sample" (ReLU per sample, then sum) or "mean" (average features first).
        select: pick the top `fraction` of correct samples per class; ``False`` uses every sample given.
        fraction, min_per_class, max_per_class, hold_budget: see `select_samples`.
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
            contributions of convolutions, on a CUDA device with Triton; `modellego.kernels`).
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD`` under
            torchrun) whose every process calls this with the same model and arguments and its
            own shard of `batches`; every process then returns the profile of all shards
            together (`modellego.distributed`).
    """
    thresholds = thresholds or Thresholds()
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
                           "classes": None if classes is None else [int(c) for c in classes], "select": select,
                           "fraction": fraction, "min_per_class": min_per_class, "max_per_class": max_per_class,
                           "mode": mode, "thresholds": thresholds.to_json()}, group)
    t0 = time.perf_counter()
    if select:
        sel = select_samples(model, batches, classes=classes, fraction=fraction, min_per_class=min_per_class,
                             max_per_class=max_per_class, device=device, group=group, progress=progress,
                             hold_budget=hold_budget)
    else:
        sel = every_sample(batches, group=group)
    t_select = time.perf_counter() - t0
    assert sel.example is not None  # both refuse empty data
    example = sel.example.to(device)
    graph = trace(model, example)
    n_out = graph.num_classes
    classes = list(range(n_out)) if classes is None else [int(c) for c in classes]
    if not classes:
        raise UserError("no classes to profile")
    bad = [c for c in classes if not 0 <= c < n_out]
    if bad:
        raise UserError(f"classes {bad} are out of range for a model with {n_out} outputs")
    for c in classes:
        sel.selected.setdefault(c, 0)

    # One class's sums: a float per filter and input channel, in the dtype the layers see (the input's).
    per_class_bytes = example.element_size() * sum(
        l.out_features * l.in_features // (l.module.groups if l.kind == "conv" else 1) for l in graph.layers.values())
    if class_chunk is None:
        if memory_budget is None:  # read after the selection pass, which has let go of its batches
            memory_budget = default_budget(device)
        class_chunk = max(1, min(len(classes), memory_budget // max(per_class_bytes, 1)))
        log.debug("profiling %d classes at a time (%d bytes of sums each, budget %d bytes)",
                  class_chunk, per_class_bytes, memory_budget)
    if group is not None:  # the smallest chunk of all processes: their all-reduces must pair up
        class_chunk = min(distributed.gather(class_chunk, group))  # type: ignore[type-var]
    names = class_names_of(model, n_out)
    in_masks: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    out_masks: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    kept_r: dict[str, list[torch.Tensor]] = {k: [] for k in graph.layers}
    t1 = time.perf_counter()
    bar = tqdm(total=len(classes), desc="profiling classes", unit="class",
               disable=None if progress and rank == 0 else True)
    for i in range(0, len(classes), class_chunk):
        part = classes[i: i + class_chunk]
        accs = contributions(model, graph, sel.batches(batch_size, part), part, mode=mode, device=device,
                             kernel=kernel)
        if group is not None:
            distributed.sum_accumulators(accs, group)
        for slot, c in enumerate(part):
            r = {name: relative(acc.s_hat(slot)) for name, acc in accs.items()}
            ins, outs = locate_class(graph, r, c, thresholds)
            for k in graph.layers:
                in_masks[k].append(ins[k])
                out_masks[k].append(outs[k])
                if keep_contributions:
                    kept_r[k].append(r[k].cpu())  # native dtype: relocating reproduces the masks exactly
            bar.update(1)
        del accs
    bar.close()
    info = get_info(model)
    provenance = {
        "model_sha256": model_sha256,
        "arch": info.arch if info else type(model).__name__,
        "input_shape": list(example.shape[1:]),
        "processes": processes,
        "mode": mode,
        "kernel": kernel,
        "selection": {"fraction": fraction, "min_per_class": min_per_class, "max_per_class": max_per_class,
                      "enabled": select, **{k: {str(c): n for c, n in v.items()} for k, v in sel.summary().items() if isinstance(v, dict)}},
        "short": list(sel.short),
        "missing": [c for c in classes if sel.selected.get(c, 0) == 0],
        "seconds": {"select": round(t_select, 3), "contributions_and_locating": round(time.perf_counter() - t1, 3)},
        "torch_version": torch.__version__,
    }
    return Profile(tuple(classes), tuple(names[c] for c in classes),
                   {k: torch.stack(v) for k, v in in_masks.items()},
                   {k: torch.stack(v) for k, v in out_masks.items()}, thresholds, provenance,
                   {k: torch.stack(v) for k, v in kept_r.items()} if keep_contributions else None)
