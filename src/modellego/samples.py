"""Sample selection: per class, the training samples the model is most confident about, correctly."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import UserError
from .hooks import preserve_training

log = logging.getLogger(__name__)


@dataclass
class SampleSelection:
    """Selected samples and how many each class had.

    Attributes:
        inputs: Shape (N, C, H, W), on the CPU.
        labels: Shape (N,).
        seen: samples seen per class.
        correct: correctly classified samples per class.
        selected: samples kept per class.
        short: classes with fewer than the requested minimum of correct samples.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    seen: dict[int, int] = field(default_factory=dict)
    correct: dict[int, int] = field(default_factory=dict)
    selected: dict[int, int] = field(default_factory=dict)
    short: list[int] = field(default_factory=list)

    @property
    def missing(self) -> list[int]:
        """Classes without a single selected sample."""
        return [c for c, n in self.selected.items() if n == 0]

    def batches(self, batch_size: int, classes: Sequence[int] | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(len(self.labels))
        if classes is not None:
            idx = idx[torch.isin(self.labels, torch.as_tensor(list(classes)))]
        for i in range(0, len(idx), batch_size):
            j = idx[i: i + batch_size]
            yield self.inputs[j], self.labels[j]

    def summary(self) -> dict[str, object]:
        return {"seen": self.seen, "correct": self.correct, "selected": self.selected, "short": self.short}


@torch.no_grad()
def select_samples(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    classes: Sequence[int] | None = None,
    fraction: float = 0.01,
    min_per_class: int = 5,
    max_per_class: int = 256,
    device: torch.device | str | None = None,
) -> SampleSelection:
    """Keep, per class, the top `fraction` of its correctly classified samples by predicted probability.

    The count per class is ``ceil(fraction * correct)``, clamped to [min_per_class, max_per_class]
    and to what exists. A class with fewer correct samples than `min_per_class` is reported in
    ``short`` (and logged by name), never an error.

    Args:
        model: the classifier (evaluated in eval mode, restored afterwards).
        batches: iterable of (inputs, labels), e.g. the training split.
        classes: classes to select for (default: all the model's outputs).
        fraction: fraction of correct samples kept per class, in (0, 1].
        min_per_class: lower bound on the kept count per class.
        max_per_class: upper bound, also the most candidates held in memory per class.
        device: where to run the model (default: where its parameters are).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if min_per_class < 1 or max_per_class < min_per_class:
        raise UserError(f"need 1 <= min_per_class <= max_per_class, got {min_per_class}, {max_per_class}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    best: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    seen: dict[int, int] = {}
    correct: dict[int, int] = {}
    with preserve_training(model):
        model.eval()
        for x, y in batches:
            logits = model(x.to(device))
            if classes is None:
                classes = list(range(logits.shape[1]))
            prob = logits.float().softmax(1).cpu()
            hit = prob.argmax(1) == y
            score = prob.gather(1, y.clamp(0, prob.shape[1] - 1)[:, None]).squeeze(1)
            for c in classes:
                of_c = y == c
                seen[c] = seen.get(c, 0) + int(of_c.sum())
                ok = of_c & hit
                correct[c] = correct.get(c, 0) + int(ok.sum())
                if not ok.any():
                    continue
                s, xs = score[ok], x[ok].cpu()
                if c in best:
                    s, xs = torch.cat([best[c][0], s]), torch.cat([best[c][1], xs])
                top = s.topk(min(max_per_class, len(s))).indices
                best[c] = (s[top], xs[top])
    if classes is None:
        raise UserError("no samples were given")
    inputs, labels, selected, short = [], [], {}, []
    for c in classes:
        n_ok = correct.get(c, 0)
        want = min(max(math.ceil(fraction * n_ok), min_per_class), max_per_class)
        n = min(want, n_ok)
        selected[c] = n
        if n_ok < min_per_class:
            short.append(c)
        if n:
            inputs.append(best[c][1][:n])  # topk is sorted descending
            labels.append(torch.full((n,), c, dtype=torch.long))
    if short:
        log.warning("classes with fewer than %d correctly classified samples: %s", min_per_class,
                    ", ".join(f"{c} ({correct.get(c, 0)} correct of {seen.get(c, 0)})" for c in short))
    if not inputs:
        raise UserError("the model classified no sample of the requested classes correctly")
    return SampleSelection(torch.cat(inputs), torch.cat(labels), seen, correct, selected, short)
