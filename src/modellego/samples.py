"""Sample selection: per class, the training samples the model is most confident about, correctly."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .errors import UserError
from .hooks import preserve_training

log = logging.getLogger(__name__)


@dataclass
class SampleSelection:
    """Selected samples and how many each class had.

    Attributes:
        inputs: Shape (N, C, H, W), on the CPU (in a process group: this process's share).
        labels: Shape (N,).
        seen: samples seen per class (in a process group: by all processes, as are the next three).
        correct: correctly classified samples per class.
        selected: samples kept per class.
        short: classes with fewer than the requested minimum of correct samples.
        example: one input as the model reads it (Shape (1, C, H, W)), also when `inputs` is empty.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    seen: dict[int, int] = field(default_factory=dict)
    correct: dict[int, int] = field(default_factory=dict)
    selected: dict[int, int] = field(default_factory=dict)
    short: list[int] = field(default_factory=list)
    example: torch.Tensor | None = None

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
    group: torch.distributed.ProcessGroup | None = None,
    progress: bool = False,
) -> SampleSelection:
    """Keep, per class, the top `fraction` of its correctly classified samples by predicted probability.

    Samples are ranked by the log-odds of their class (`log_odds`, in float64), which orders them
    as the probability does without float32's ties at 1.0, so which samples are kept does not
    depend on the order they are read in.

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
        group: a torch.distributed process group whose every process calls this with its own
            shard of the batches: the selection is then that of all shards together, each process
            keeping its share (`modellego.distributed`).
        progress: show a progress bar over the batches (in a process group, the first process's).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if min_per_class < 1 or max_per_class < min_per_class:
        raise UserError(f"need 1 <= min_per_class <= max_per_class, got {min_per_class}, {max_per_class}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    best: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # class -> (scores, descending; inputs)
    seen_all = correct_all = torch.zeros(0, dtype=torch.long)  # per output, once the first batch has run
    example: torch.Tensor | None = None
    outputs: int | None = None
    with preserve_training(model):
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(batches, total=total, desc="selecting samples", unit="batch",
                   disable=None if progress and distributed.world(group)[0] == 0 else True)
        for x, y in bar:
            logits = model(x.to(device))
            y = y.cpu()
            if example is None:
                example, outputs = x[:1].cpu(), logits.shape[1]
                seen_all = correct_all = torch.zeros(outputs, dtype=torch.long)
                wanted = torch.zeros(outputs, dtype=torch.bool)
                if classes is None:
                    classes = list(range(outputs))
                wanted[[c for c in classes if 0 <= c < outputs]] = True
            z = logits.detach().to("cpu", torch.float64)  # (B, outputs)
            inside = (y >= 0) & (y < outputs)  # labels the model has an output for
            hit = inside & (z.argmax(1) == y)
            score = log_odds(z, y.clamp(0, outputs - 1))
            seen_all = seen_all + torch.bincount(y[inside], minlength=outputs)
            correct_all = correct_all + torch.bincount(y[hit], minlength=outputs)
            # Only the classes with a correct sample here can change their candidates: with a
            # 1000-class head that is a few hundred per batch, not every class.
            for c in y[hit & wanted[y.clamp(0, outputs - 1)]].unique().tolist():
                ok = hit & (y == c)
                s, xs = score[ok], x[ok.to(x.device)].cpu()
                if c in best:
                    s, xs = torch.cat([best[c][0], s]), torch.cat([best[c][1], xs])
                top = s.topk(min(max_per_class, len(s))).indices
                best[c] = (s[top], xs[top])
    seen = {c: int(seen_all[c]) if 0 <= c < len(seen_all) else 0 for c in classes or ()}
    correct = {c: int(correct_all[c]) if 0 <= c < len(correct_all) else 0 for c in classes or ()}
    if group is not None:
        distributed.agree_shards(None if example is None else (outputs, tuple(example.shape[1:])), group,
                                 "the model's outputs and input shape")
        classes = list(range(outputs)) if classes is None else classes  # type: ignore[arg-type]
        seen, correct = distributed.sum_counts([seen, correct], classes, group)
    if classes is None or example is None:
        raise UserError("no samples were given")
    want = {c: min(max(math.ceil(fraction * correct.get(c, 0)), min_per_class), max_per_class, correct.get(c, 0))
            for c in classes}
    if group is None:
        mine = {c: torch.arange(want[c]) for c in classes}  # the scores are in descending order
    else:
        empty = torch.empty(0)
        mine = dict(zip(classes, distributed.global_top([best[c][0] if c in best else empty for c in classes],
                                                        [want[c] for c in classes], max_per_class, group)))
    inputs, labels, short = [example[:0]], [torch.empty(0, dtype=torch.long)], []
    for c in classes:
        if correct.get(c, 0) < min_per_class:
            short.append(c)
        if len(mine[c]):
            inputs.append(best[c][1][mine[c]])
            labels.append(torch.full((len(mine[c]),), c, dtype=torch.long))
    if short and distributed.world(group)[0] == 0:  # the counts are everyone's: one process says it
        log.warning("classes with fewer than %d correctly classified samples: %s", min_per_class,
                    ", ".join(f"{c} ({correct.get(c, 0)} correct of {seen.get(c, 0)})" for c in short))
    if not any(want.values()):
        raise UserError("the model classified no sample of the requested classes correctly")
    return SampleSelection(torch.cat(inputs), torch.cat(labels), seen, correct, want, short, example)


def log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of each sample's label under the softmax, from the logits.

    It orders samples exactly as the probability p does, but a confident model's float32
    probabilities round to 1.0 for hundreds of training images (LeNet-5 on MNIST), which would
    leave the choice among them to the order the images are read in. The log-odds,
    z_y - logsumexp_{j != y} z_j, stays finite and distinct.

    Shape: logits (B, C), labels (B,) in [0, C) -> (B,), in the logits' dtype.
    """
    own = logits.gather(1, labels[:, None])  # (B, 1)
    others = logits.scatter(1, labels[:, None], -torch.inf).logsumexp(1)  # (B,)
    return own.squeeze(1) - others


def every_sample(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 group: torch.distributed.ProcessGroup | None = None) -> SampleSelection:
    """Every sample given, none ranked or dropped (`modellego.profile(..., select=False)`); in a
    process group, each process keeps its own and the counts are those of all processes."""
    pairs = [(x.cpu(), y.cpu()) for x, y in batches]
    example = pairs[0][0][:1] if pairs else None
    if group is not None:
        distributed.agree_shards(None if example is None else tuple(example.shape[1:]), group, "the input shape")
    if example is None:
        raise UserError("no samples were given")
    inputs, labels = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
    classes = sorted(set(labels.unique().tolist()))
    if group is not None:
        classes = sorted(set().union(*distributed.gather(classes, group)))  # type: ignore[arg-type]
    counts = {c: int((labels == c).sum()) for c in classes}
    if group is not None:
        (counts,) = distributed.sum_counts([counts], classes, group)
    return SampleSelection(inputs, labels, dict(counts), {}, dict(counts), [], example)  # no model: none judged

