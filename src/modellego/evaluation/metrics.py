"""Evaluation: per-class accuracy (with the Masked-Base baseline), parameters, FLOPs, latency."""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError
from ..hooks import eval_mode
from ..io.info import get_info


@dataclass
class Accuracy:
    """Accuracy on a task. Labels and predictions are indices of the model's outputs' classes.

    Attributes:
        per_class: accuracy (%) per class index (source-model numbering).
        counts: test samples per class.
        overall: accuracy over all samples (%).
        mean_per_class: the paper's metric: mean of per-class accuracies (%).
        worst_class: lowest per-class accuracy (%): a collapsed class shows here.
    """

    per_class: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    overall: float = 0.0

    @property
    def mean_per_class(self) -> float:
        return statistics.fmean(self.per_class.values()) if self.per_class else 0.0

    @property
    def worst_class(self) -> float:
        return min(self.per_class.values()) if self.per_class else 0.0

    def to_json(self) -> dict[str, object]:
        return {"overall": round(self.overall, 4), "mean_per_class": round(self.mean_per_class, 4),
                "worst_class": round(self.worst_class, 4),
                "per_class": {str(k): round(v, 4) for k, v in self.per_class.items()},
                "counts": {str(k): v for k, v in self.counts.items()}}


def output_classes(model: nn.Module, num_outputs: int) -> list[int]:
    """Source-class index of each output (identity for a model without a description)."""
    info = get_info(model)
    return list(info.classes) if info else list(range(num_outputs))


@torch.no_grad()
def accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    classes: Sequence[int] | None = None,
    restrict: bool = False,
    device: torch.device | str | None = None,
) -> Accuracy:
    """Accuracy of `model` on the samples of `classes` (source-class numbering).

    Args:
        model: a classifier; its `ModelInfo` says which source class each output is.
        batches: (inputs, labels) with labels in source-class numbering.
        classes: the task (default: every class the model predicts).
        restrict: take the argmax over the task's outputs only (Masked-Base); by default the
            argmax runs over all outputs (Base).
        device: where to run (default: where the model's parameters are).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    out_classes: list[int] | None = None
    with eval_mode(model):
        for x, y in batches:
            logits = model(x.to(device)).float().cpu()
            if out_classes is None:
                out_classes = output_classes(model, logits.shape[1])
                task = list(out_classes) if classes is None else [int(c) for c in classes]
                missing = [c for c in task if c not in out_classes]
                if missing:
                    raise UserError(f"the model does not predict classes {missing} (it predicts {out_classes})")
                cols = torch.tensor([out_classes.index(c) for c in task]) if restrict else torch.arange(len(out_classes))
                col_class = torch.tensor(out_classes)[cols]
                task_t = torch.tensor(task)
            y = y.cpu()
            keep = torch.isin(y, task_t)
            if not keep.any():
                continue
            pred = col_class[logits[keep][:, cols].argmax(1)]
            for c, ok in zip(y[keep].tolist(), (pred == y[keep]).tolist()):
                counts[c] = counts.get(c, 0) + 1
                hits[c] = hits.get(c, 0) + int(ok)
    if not counts:
        raise UserError("no test sample belongs to the task's classes")
    per_class = {c: 100.0 * hits[c] / counts[c] for c in sorted(counts)}
    return Accuracy(per_class, dict(sorted(counts.items())), 100.0 * sum(hits.values()) / sum(counts.values()))


@dataclass
class Cost:
    """Size and speed of a model for one input shape."""

    params: int
    flops: int
    latency_ms: float
    batch: int
    device: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one sample (torch.utils.flop_counter; multiply-add = 2)."""
    device = next(model.parameters()).device
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: Sequence[int], *, batch: int = 1, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of one forward pass of `batch` samples, after warm-up."""
    device = next(model.parameters()).device
    x = torch.randn(batch, *input_shape, device=device)
    with eval_mode(model):
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def cost(model: nn.Module, input_shape: Sequence[int], *, batch: int = 1, repeats: int = 20) -> Cost:
    """Parameters, FLOPs per sample and median latency (ms) at `batch`."""
    device = next(model.parameters()).device
    return Cost(count_params(model), count_flops(model, input_shape),
                measure_latency(model, input_shape, batch=batch, repeats=repeats), batch, str(device))
