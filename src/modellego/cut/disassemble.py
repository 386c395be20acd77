"""Disassembling: cut a task's channels out of a classifier as a standalone component."""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..calibration.calibrate import DEFAULT_CALIBRATION, parse_methods
from ..calibration.calibrate import calibrate as calibrate_logits
from ..calibration.draw import CalibrationDraw
from ..core.distributed import batch_share, world
from ..core.graph import ChannelGraph, trace
from ..core.locate import keep_channels
from ..core.profiling import Profile, class_names_of
from ..core.profiling import profile as run_profile
from ..errors import UnsupportedGraphError, UserError
from ..hooks import forward_hooks
from ..io.info import InputSpec, ModelInfo, get_info, set_info, weights_hash
from ..io.plan import compose_plans
from .budget import locate_budget
from .prune import build_plan, kept_features, prune_layers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)


def check_classes(classes: Sequence[int], num_classes: int | None) -> list[int]:
    """Validate a task: non-empty, unique, in range (range not checked when `num_classes` is None)."""
    classes = [int(c) for c in classes]
    if not classes:
        raise UserError("the task has no classes")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise UserError(f"duplicate classes in the task: {dup}")
    if num_classes is not None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"classes {bad} are out of range: the model has {num_classes} classes (0-{num_classes - 1})")
    return classes


def masked_forward(model: nn.Module, graph: ChannelGraph, keep: Mapping[int, Sequence[int]], x: torch.Tensor) -> torch.Tensor:
    """The source model with every dropped channel zeroed where a layer reads it.

    This is what a pruned component must compute exactly (on its kept logits).
    """
    masks = {}
    for name, layer in graph.layers.items():
        n = layer.in_features
        m = torch.zeros(n, dtype=torch.bool)
        m[kept_features(graph.segments(layer.input), keep)] = True
        masks[name] = m

    def pre_hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
            x = inputs[0]
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return (x * masks[name].to(x.device, x.dtype).view(shape),) + tuple(inputs[1:])
        return hook

    with forward_hooks(model, {n: pre_hook_for(n) for n in masks}, pre=True), torch.no_grad():
        return model(x)


def disassemble(
    model: nn.Module,
    classes: Sequence[int],
    *,
    profile: Profile | None = None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibrate: str = DEFAULT_CALIBRATION,
    calibration_images: int = 2000,
    flops: float | None = None,
    budget_rank: str = "task",
    verify: bool = True,
    progress: bool = False,
    group: ProcessGroup | None = None,
    **profile_kwargs: Any,
) -> nn.Module:
    """Cut the component of `model` for the task `classes` (output indices, in the order wanted).

    The component is a standalone copy of the model with irrelevant channels removed physically
    and the final layer reduced to `classes`; the source model is not modified.

    Args:
        model: the source classifier.
        classes: output indices of the task; the component's outputs follow this order.
        profile: a `Profile` of this model (computed from `batches` if not given).
        batches: (inputs, labels) of TRAINING data, labels as the model's output indices. Without
            a `profile`, the profile is computed from them; without `calibration`, a seeded draw of
            `calibration_images` of the task's images from the same batches (in the same pass, so
            a one-shot iterator is fine) calibrates the component.
        calibration: (inputs, labels) of TRAINING images of the task's classes (labels in the
            source's numbering). Given, the component's logits are calibrated with `calibrate`
            (no gradient step; see `modellego.calibration.calibrate`).
        calibrate: calibration method when calibration images are given or drawn (``"none"``
            for the paper's faithful cut). With neither `batches` nor `calibration`, the cut is the
            paper's: exact to the masked source, but its accuracy on the task can fall far below
            Masked-Base (BENCHMARKS.md, Table 1: e.g. 39.7% against 99.6% on a residual + inception
            CNN, 99.2% calibrated).
        calibration_images: how many images the draw from `batches` keeps.
        flops: a FLOPs budget, as a fraction of the source's: instead of the paper's β, keep in
            every layer the same share of the most relevant inputs, the largest that fits (see
            `modellego.cut.budget`; needs a profile with contributions, kept when profiling here).
        budget_rank: under a budget, ``"task"`` ranks inputs for the task's classes together (one
            share per layer) and ``"class"`` keeps a share per class and their union.
        verify: check on a random input that the component equals the source with the dropped
            channels zeroed (catches forward passes that hard-code channel counts).
        progress: show progress bars (profiling here, and ``recon`` calibration).
        group: a torch.distributed process group whose every process calls this with its own
            shard of `batches` (every world-size-th sample from its rank on, as
            `modellego.data.StreamedBatches(shard=...)` reads) or share of `calibration` (a
            consecutive run of batches, `modellego.core.distributed.batch_share`): profiling, the
            calibration draw and the calibration's sums cover every process's data, and every
            process returns the component one process would make from all of it.
        **profile_kwargs: passed to `modellego.profile` when profiling here.

    Raises:
        UserError: bad classes, or a profile of another model.
        UnsupportedGraphError: the graph has an op that cannot be followed or pruned.
    """
    classes = check_classes(classes, None)  # empty or duplicate: fail before any profiling
    methods = parse_methods(calibrate)  # an unknown method fails before any profiling too
    draw = (CalibrationDraw(classes, calibration_images, shard=world(group))
            if calibration is None and batches is not None and methods else None)
    if profile is None:
        if batches is None:
            raise UserError("disassemble needs a profile or training batches to compute one")
        if flops is not None:
            profile_kwargs["keep_contributions"] = True
        profile_kwargs["classes"] = classes
        profile_kwargs["group"] = group
    elif profile.model_sha256 and profile.model_sha256 != weights_hash(model.state_dict()):
        raise UserError("the profile was computed from another model (weights hash differs); re-profile this model")
    profile = profile_with_draw(model, batches, profile, draw, progress=progress, **profile_kwargs)
    shape = profile.provenance.get("input_shape")
    if not shape:
        raise UserError("the profile does not record the input shape")
    example = example_input(model, shape)
    graph = trace(model, example)
    profile.check_graph(graph)  # a profile of another model names the layer that does not fit
    classes = check_classes(classes, graph.num_classes)
    provenance: dict[str, Any] = {
        "task": list(classes),
        "thresholds": profile.thresholds.to_json(),
        "profile": {k: profile.provenance.get(k) for k in ("mode", "selection", "short", "processes")},
    }
    if flops is None:
        keep = keep_channels(graph, profile.task_in_masks(classes), classes)
    else:
        budgeted = locate_budget(model, graph, example, profile, classes, flops, rank=budget_rank)
        keep = budgeted.keep
        provenance["flops_budget"] = {"budget": flops, **budgeted.to_json()}
    if draw is not None:
        draw.reduce(group)  # every process holds the whole draw, and calibrates from its share
        calibration = batch_share(drawn_calibration(model, draw, graph.num_classes), group)
        provenance["calibration_draw"] = {"images": len(draw), "from": "batches", "seed": draw.seed}
    return extract(model, graph, example, keep, classes, provenance=provenance, calibration=calibration,
                   calibrate=calibrate, verify=verify, progress=progress, group=group)


def profile_with_draw(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
                      profile: Profile | None, draw: CalibrationDraw | None, *, progress: bool = False,
                      **profile_kwargs: Any) -> Profile:
    """`profile`, or one computed from `batches`; `draw` sees every batch once, in the profiling pass
    when there is one (so a one-shot iterator is read once), else in a pass of its own."""
    if profile is None:
        assert batches is not None  # callers say which of the two they need
        return run_profile(model, draw.wrap(batches) if draw is not None else batches, progress=progress,
                           **profile_kwargs)
    if draw is not None and batches is not None:
        for x, y in batches:
            draw.update(x, y)
    return profile


def drawn_calibration(model: nn.Module, draw: CalibrationDraw, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A draw from profiling batches (labels = output indices) as calibration batches (labels = the source's)."""
    src = get_info(model)
    labels = torch.as_tensor(src.classes if src else range(num_classes))
    return [(x, labels[y]) for x, y in draw.batches()]


# The largest difference from the masked source, relative to the logits' scale, that summation order
# explains: channels removed instead of zeroed change the order of a few thousand additions.
VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf for different shapes): a scale-free test that tiny logits cannot pass."""
    if got.shape != want.shape:
        return float("inf")
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def example_input(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A random batch of two inputs of `shape` on the model's device and dtype."""
    param = next(model.parameters())
    return torch.randn(2, *shape, device=param.device, dtype=param.dtype)


def _input_of(model: nn.Module, example: torch.Tensor) -> InputSpec | None:
    """The input of a source that records none, read off the example: its images as the model reads
    them (no normalisation), so that its components assemble without a hand-built description.

    Only for a model whose first layer (as files check it: in registration order) is a convolution
    reading those channels; otherwise the caller describes the input.
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if example.dim() != 4 or not isinstance(first, nn.Conv2d) or first.in_channels != example.shape[1]:
        return None
    c, h, w = example.shape[1:]
    return InputSpec(c, (h, w), (0.0,) * c, (1.0,) * c)


def extract(
    model: nn.Module,
    graph: ChannelGraph,
    example: torch.Tensor,
    keep: Mapping[int, Sequence[int]],
    classes: Sequence[int],
    *,
    provenance: dict[str, Any],
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    calibrate: str = DEFAULT_CALIBRATION,
    verify: bool = True,
    progress: bool = False,
    group: ProcessGroup | None = None,
) -> nn.Module:
    """The component of `model` keeping channels `keep` (per channel space) and outputs `classes`.

    Checks it against the masked source (`verify`), calibrates it if `calibration` is given, and
    attaches its description; `provenance` is merged into the description's provenance.
    """
    plan = build_plan(graph, keep)
    component = prune_layers(copy.deepcopy(model), plan).eval()
    if verify:
        hint = ("the pruned component does not reproduce the masked source model; its forward pass "
                "probably hard-codes channel counts (e.g. x.view(-1, 400)); use nn.Flatten or torch.flatten")
        try:
            with torch.no_grad():
                got = component(example)
        except RuntimeError as e:  # e.g. a hard-coded view no longer fits the pruned tensor
            raise UnsupportedGraphError(f"{hint} ({e})") from e
        want = masked_forward(model, graph, keep, example)[:, list(classes)]
        error = relative_error(got, want)
        if error > VERIFY_TOLERANCE.get(want.dtype, 1e-2):
            raise UnsupportedGraphError(f"{hint} (largest difference {error:.2e} of the logits' scale)")
    src = get_info(model)
    names = class_names_of(model, graph.num_classes)
    source_classes = src.classes if src else tuple(range(graph.num_classes))
    calibration_report: dict[str, object] = {"method": "none"}
    if calibration is not None:
        calibration_report = calibrate_logits(component, model, classes, calibration, calibrate,
                                              task_labels=[source_classes[c] for c in classes], plan=plan,
                                              progress=progress, group=group)
    source = {"sha256": weights_hash(model.state_dict()), "kind": src.kind if src else "model",
              "dataset": src.dataset if src else None}
    info = ModelInfo(
        arch=src.arch if src else None,
        arch_kwargs=dict(src.arch_kwargs) if src else {},
        class_names=tuple(names[c] for c in classes),
        classes=tuple(source_classes[c] for c in classes),
        input=src.input if src and src.input else _input_of(model, example),
        dataset=src.dataset if src else None,
        kind="component",
        pruning=compose_plans(src.pruning if src else None, plan),
        provenance={**provenance, "source": source, "calibration": calibration_report},
    )
    set_info(component, info)
    return component
