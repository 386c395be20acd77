"""Model compression: the component of every class (the paper's second application, its Table 8).

Disassembling a model for all of its classes keeps every channel some class's route uses and
drops the rest: a smaller model for the same task, without training. Two forms:

- the paper's: all classes at the thresholds (α, β). Its size is whatever they give; on the
  width-scaled zoo the early layers serve every class, so little is dropped.
- under a FLOPs budget (`flops=`): every layer keeps the same share of its inputs ranked by their
  relevance to all classes together (`modellego.cut.budget`), the largest share that fits.

Either way the component is then calibrated from training images (default ``recon+balance``:
every layer refitted by least squares to the source's kept features, no gradient step), and may
be fine-tuned briefly. `compress_sweep` makes several budgets from one profile and one
calibration draw and measures each on the test split, for `tradeoff_figure`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ..calibration.calibrate import DEFAULT_CALIBRATION, parse_methods
from ..calibration.draw import CalibrationDraw
from ..core.profiling import Profile
from ..core.profiling import profile as run_profile
from ..cut.disassemble import disassemble, drawn_calibration, profile_with_draw
from ..data import Dataset, batches
from ..errors import UserError
from ..evaluation.metrics import count_flops, count_params, measure_latency
from ..evaluation.protocol import calibration_batches, input_shape, model_transform, test_accuracy
from ..io.info import get_info
from ..training.fit import finetune

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _all_classes(model: nn.Module, profile: Profile) -> list[int]:
    """Every output of `model`, which `profile` must cover: compression keeps every class."""
    info = get_info(model)
    classes = list(profile.classes)
    if info is not None and len(info.classes) != len(classes):
        raise UserError(f"the profile covers {len(classes)} of the model's {len(info.classes)} classes; compression "
                        "keeps every class: profile all of them")
    return classes


def compress(
    model: nn.Module,
    batches: Batches | None = None,
    *,
    flops: float | None = None,
    profile: Profile | None = None,
    calibration: Batches | None = None,
    calibrate: str = DEFAULT_CALIBRATION,
    calibration_images: int = 2000,
    verify: bool = True,
    progress: bool = False,
    **profile_kwargs: Any,
) -> nn.Module:
    """The component of every class of `model`, under a FLOPs budget or at the paper's thresholds.

    Args:
        model: the trained classifier (not modified).
        batches: (inputs, labels) TRAINING batches, labels = output indices. Profiled when no
            `profile` is given; without `calibration`, a seeded draw of `calibration_images` of
            them (taken in the same pass) calibrates the component.
        flops: the budget, a fraction of the model's FLOPs in (0, 1]; ``None``: the paper's form.
        profile: a profile of `model` over all of its classes (with contributions for a budget).
        calibration: (inputs, labels) training images to calibrate from, instead of the draw.
        calibrate: calibration method (``"none"``: the cut as located, equal to the masked source).
        calibration_images: size of the draw from `batches`.
        verify: check the cut against the masked source before calibrating.
        progress: show progress bars.
        **profile_kwargs: passed to `modellego.profile`.

    Raises:
        UserError: neither `batches` nor `profile`, a profile of only some classes, a budget
            outside (0, 1] or smaller than the smallest component.
    """
    draw = CalibrationDraw(None, calibration_images) if calibration is None and parse_methods(calibrate) else None
    if profile is None and batches is None:
        raise UserError("compress needs training batches, or a profile and calibration images")
    if profile is not None and draw is not None and batches is None:
        raise UserError(f"{calibrate} calibration needs training batches or calibration=; "
                        "or pass calibrate='none' for the uncalibrated cut")
    if profile is None:
        profile_kwargs["keep_contributions"] = flops is not None
    profile = profile_with_draw(model, batches, profile, draw, progress=progress, **profile_kwargs)
    classes = _all_classes(model, profile)
    if draw is not None:
        calibration = drawn_calibration(model, draw, len(classes))
    return disassemble(model, classes, profile=profile, calibration=calibration, calibrate=calibrate, flops=flops,
                       verify=verify, progress=progress)


@dataclass(frozen=True)
class CompressionRow:
    """One compressed model measured on the test split (``budget`` None: the paper's form)."""

    name: str
    budget: float | None
    accuracy: float
    worst_class: float
    params: int
    flops: int
    params_ratio: float
    flops_ratio: float
    latency_ms: float
    seconds: float
    finetuned_accuracy: float | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _measure(name: str, model: nn.Module, source: tuple[int, int], ds: Dataset, budget: float | None,
             seconds: float, latency_batch: int) -> CompressionRow:
    """One row; `source` is the source's (parameters, FLOPs), counted once per sweep."""
    shape = input_shape(model, ds)
    acc = test_accuracy(model, ds)
    params, flops = count_params(model), count_flops(model, shape)
    return CompressionRow(name, budget, round(acc.mean_per_class, 2), round(acc.worst_class, 2), params, flops,
                          params / source[0], flops / source[1],
                          round(measure_latency(model, shape, batch=latency_batch, repeats=10), 3), round(seconds, 2))


def compress_sweep(
    model: nn.Module,
    ds: Dataset,
    budgets: Sequence[float],
    *,
    paper: bool = False,
    calibrate: str = DEFAULT_CALIBRATION,
    calibration_images: int = 2000,
    finetune_epochs: int = 0,
    profile: Profile | None = None,
    latency_batch: int = 64,
    progress: bool = False,
    **profile_kwargs: Any,
) -> tuple[list[CompressionRow], list[nn.Module]]:
    """Compress `model` at each budget (and the paper's form when `paper`), measure each on `ds`'s test split.

    One profile (with contributions) and one calibration draw serve every model. The first row is
    the source itself (budget 1.0, its own time 0). With `finetune_epochs`, each compressed model
    is fine-tuned on `ds` (labels) and its accuracy after is in ``finetuned_accuracy``; the
    returned models are the fine-tuned ones.

    Returns: the rows, and the compressed models in the same order (without the source).
    """
    if not budgets and not paper:
        raise UserError("nothing to compress: give FLOPs budgets, or the paper's form")
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise UserError(f"FLOPs budgets are fractions in (0, 1], got {bad}")
    device = next(model.parameters()).device
    t = time.perf_counter()
    if profile is None:
        train = batches(ds.train, 256, transform=model_transform(model, ds), device=device)
        profile = run_profile(model, train, keep_contributions=bool(budgets), progress=progress, **profile_kwargs)
    profile_s = time.perf_counter() - t
    classes = _all_classes(model, profile)
    calibration = (calibration_batches(model, ds, classes, images=calibration_images)
                   if parse_methods(calibrate) else None)
    source = (count_params(model), count_flops(model, input_shape(model, ds)))
    rows = [_measure("source", model, source, ds, 1.0, 0.0, latency_batch)]
    models = []
    for budget in ([None] if paper else []) + list(budgets):
        t = time.perf_counter()
        comp = disassemble(model, classes, profile=profile, calibration=calibration, calibrate=calibrate,
                           flops=budget, progress=progress)
        name = "paper thresholds" if budget is None else f"FLOPs {budget:g}"
        row = _measure(name, comp, source, ds, budget, time.perf_counter() - t + profile_s, latency_batch)
        if finetune_epochs:
            finetune(comp, ds, epochs=finetune_epochs, progress=progress)
            row = CompressionRow(**{**asdict(row), "finetuned_accuracy": round(test_accuracy(comp, ds).mean_per_class, 2)})
        log.info("%s: %.2f%% at %.1f%% of the FLOPs", name, row.accuracy, 100 * row.flops_ratio)
        rows.append(row)
        models.append(comp)
    return rows, models


def markdown_table(rows: Sequence[CompressionRow]) -> str:
    """The rows as a Markdown table (the time includes the shared profile's)."""
    tuned = any(r.finetuned_accuracy is not None for r in rows)
    head = "| model | accuracy % | worst class % |" + (" fine-tuned % |" if tuned else "") + \
        " params | FLOPs | FLOPs kept | latency ms | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ft = f" {r.finetuned_accuracy if r.finetuned_accuracy is not None else '-'} |" if tuned else ""
        lines.append(f"| {r.name} | {r.accuracy:.2f} | {r.worst_class:.2f} |{ft} {r.params:,} | {r.flops:,} | "
                     f"{r.flops_ratio:.1%} | {r.latency_ms} | {r.seconds} |")
    return "\n".join(lines) + "\n"


def tradeoff_figure(rows: Sequence[CompressionRow], title: str = "") -> Figure:
    """Accuracy against the FLOPs kept (left) and the parameters kept (right), one point per row."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attr, label in ((axes[0], "flops_ratio", "FLOPs kept (% of the source's)"),
                            (axes[1], "params_ratio", "parameters kept (% of the source's)")):
        budgeted = sorted((r for r in rows if r.budget is not None), key=lambda r: getattr(r, attr))
        ax.plot([100 * getattr(r, attr) for r in budgeted], [r.accuracy for r in budgeted], "o-", color="#1f77b4",
                label="FLOPs budget, training-free")
        tuned = [r for r in budgeted if r.finetuned_accuracy is not None]
        if tuned:
            ax.plot([100 * getattr(r, attr) for r in tuned], [r.finetuned_accuracy for r in tuned], "^--",
                    color="#2ca02c", label="FLOPs budget, fine-tuned")
        for r in rows:
            if r.budget is None:
                ax.plot(100 * getattr(r, attr), r.accuracy, "s", color="#d62728", label="paper thresholds")
                if r.finetuned_accuracy is not None:
                    ax.plot(100 * getattr(r, attr), r.finetuned_accuracy, "s", mfc="none", color="#d62728",
                            label="paper thresholds, fine-tuned")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, mean per class (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
