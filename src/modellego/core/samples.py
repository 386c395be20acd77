"""Sample selection: per class, the training samples the model is most confident about, correctly."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..hooks import eval_mode
from ..memory import default_budget
from . import distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionConfig:
    """How many samples per class `select_samples` keeps (the paper: the top 1% of correct ones).

    Attributes:
        fraction: fraction of correct samples kept per class, in (0, 1].
        min_per_class: lower bound on the kept count per class.
        max_per_class: upper bound, also the most candidates kept per class during the pass.
        hold_budget: bytes of candidate inputs held during the pass (default: half the host's
            available memory, `memory.default_budget`); past it the batches are read again.
    """

    fraction: float = 0.01
    min_per_class: int = 5
    max_per_class: int = 256
    hold_budget: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_per_class < 1 or self.max_per_class < self.min_per_class:
            raise UserError(f"need 1 <= min_per_class <= max_per_class, got {self.min_per_class}, {self.max_per_class}")
        if self.hold_budget is not None and self.hold_budget < 0:
            raise UserError(f"hold_budget must be >= 0 bytes, got {self.hold_budget}")

    def to_json(self) -> dict[str, float | int | None]:
        return {"fraction": self.fraction, "min_per_class": self.min_per_class, "max_per_class": self.max_per_class}


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


class _Candidates:
    """Per class, the best `depth` candidates so far: their scores (descending), their positions
    in this process's stream of samples and, while `inputs` is not None, the inputs themselves.

    New candidates wait in a pending list, merged once a class has `depth` of them or
    `MERGE_EVERY` batches' worth: the held inputs are copied once per merge instead of once per
    batch that brings the class a candidate. Call `merge` before reading the results.
    """

    MERGE_EVERY = 8

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.scores: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] | None = {}
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        self.nbytes = 0  # of the inputs held, pending ones included

    def add(self, c: int, scores: torch.Tensor, positions: torch.Tensor, inputs: torch.Tensor | None) -> None:
        self.pending.setdefault(c, []).append((scores, positions, inputs))
        if inputs is not None and self.inputs is not None:
            self.nbytes += _nbytes(inputs)
        parts = self.pending[c]
        if len(parts) >= self.MERGE_EVERY or sum(len(s) for s, _, _ in parts) >= self.depth:
            self._merge(c)

    def merge(self) -> None:
        for c in list(self.pending):
            self._merge(c)

    def _merge(self, c: int) -> None:
        parts = self.pending.pop(c)
        if c in self.scores:
            held = self.inputs[c] if self.inputs is not None else None
            parts.insert(0, (self.scores[c], self.positions[c], held))
        scores = torch.cat([s for s, _, _ in parts])
        top = scores.topk(min(self.depth, len(scores))).indices
        self.scores[c], self.positions[c] = scores[top], torch.cat([p for _, p, _ in parts])[top]
        if self.inputs is not None:
            xs = torch.cat([x for _, _, x in parts])  # type: ignore[misc]
            self.nbytes -= _nbytes(xs)
            self.inputs[c] = xs[top]
            self.nbytes += _nbytes(self.inputs[c])

    def drop_inputs(self) -> None:
        self.inputs, self.nbytes = None, 0
        self.pending = {c: [(s, p, None) for s, p, _ in parts] for c, parts in self.pending.items()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
    hold_budget: int | None = None,
) -> SampleSelection:
    """Keep, per class, the top `fraction` of its correctly classified samples by predicted probability.

    Samples are ranked by the log-odds of their class (`log_odds`, in float64), which orders them
    as the probability does without float32's ties at 1.0, so which samples are kept does not
    depend on the order they are read in.

    The count per class is ``ceil(fraction * correct)``, clamped to [min_per_class, max_per_class]
    and to what exists. A class with fewer correct samples than `min_per_class` is reported in
    ``short`` (and logged by name), never an error.

    The pass holds up to `max_per_class` candidates per class, since the count is known only at
    the end. When their inputs would take more than `hold_budget` bytes (1000 classes of 224×224
    images: 154 GB), it keeps only their scores and positions and reads `batches` a second time,
    without the model, for the selected inputs; `batches` must then give the same samples in the
    same order again (a list, or a loader without shuffling), which is checked on the labels.

    Args:
        model: the classifier (evaluated in eval mode, restored afterwards).
        batches: iterable of (inputs, labels), e.g. the training split.
        classes: classes to select for (default: all the model's outputs).
        fraction, min_per_class, max_per_class, hold_budget: see `SelectionConfig`.
        device: where to run the model (default: where its parameters are).
        group: a torch.distributed process group whose every process calls this with its own
            shard of the batches: the selection is then that of all shards together, each process
            keeping its share (`modellego.core.distributed`).
        progress: show a progress bar over the batches (in a process group, the first process's).
    """
    cfg = SelectionConfig(fraction, min_per_class, max_per_class, hold_budget)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    first_rank = distributed.world(group)[0] == 0
    seen_pass = _candidate_pass(model, batches, classes, cfg, device, progress and first_rank)
    best, example, outputs = seen_pass.best, seen_pass.example, seen_pass.outputs
    classes = seen_pass.classes
    seen = {c: int(seen_pass.seen[c]) if 0 <= c < len(seen_pass.seen) else 0 for c in classes or ()}
    correct = {c: int(seen_pass.correct[c]) if 0 <= c < len(seen_pass.correct) else 0 for c in classes or ()}
    if group is not None:
        distributed.agree_shards(None if example is None else (outputs, tuple(example.shape[1:])), group,
                                 "the model's outputs and input shape")  # refuses an empty shard
    if classes is None or example is None:
        raise UserError("no samples were given")
    if group is not None:
        seen, correct = distributed.sum_counts([seen, correct], classes, group)
    want = {c: min(max(math.ceil(cfg.fraction * correct.get(c, 0)), cfg.min_per_class), cfg.max_per_class,
                   correct.get(c, 0))
            for c in classes}
    if group is None:
        mine = {c: torch.arange(want[c]) for c in classes}  # the scores are in descending order
    else:
        empty = torch.empty(0)
        mine = dict(zip(classes, distributed.global_top([best.scores.get(c, empty) for c in classes],
                                                        [want[c] for c in classes], cfg.max_per_class, group)))
    mine = {c: m for c, m in mine.items() if len(m)}
    if best.inputs is not None:
        chosen = {c: best.inputs[c][m] for c, m in mine.items()}
    else:
        chosen = _read_again(batches, {c: best.positions[c][m] for c, m in mine.items()}, progress and first_rank)
    short = [c for c in classes if correct.get(c, 0) < cfg.min_per_class]
    if short and first_rank:  # the counts are everyone's: one process says it
        log.warning("classes with fewer than %d correctly classified samples: %s", cfg.min_per_class,
                    ", ".join(f"{c} ({correct.get(c, 0)} correct of {seen.get(c, 0)})" for c in short))
    if not any(want.values()):
        raise UserError("the model classified no sample of the requested classes correctly")
    inputs = torch.cat([example[:0]] + [chosen[c] for c in classes if c in chosen])
    labels = torch.cat([torch.empty(0, dtype=torch.long)]
                       + [torch.full((len(chosen[c]),), c, dtype=torch.long) for c in classes if c in chosen])
    return SampleSelection(inputs, labels, seen, correct, want, short, example)


@dataclass
class _Pass:
    """What one reading of the batches found: candidates, per-output counts, an example input."""

    best: _Candidates
    classes: list[int] | None
    seen: torch.Tensor  # (outputs,)
    correct: torch.Tensor  # (outputs,)
    example: torch.Tensor | None = None
    outputs: int | None = None


def _candidate_pass(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    classes: Sequence[int] | None, cfg: SelectionConfig, device: torch.device, show: bool) -> _Pass:
    """Run the model once over `batches`, keeping each class's best correct candidates."""
    budget = default_budget("cpu") if cfg.hold_budget is None else cfg.hold_budget
    found = _Pass(_Candidates(cfg.max_per_class), None if classes is None else list(classes),
                  torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    best = found.best
    wanted = torch.zeros(0, dtype=torch.bool)
    position = 0  # of the batch's first sample in this process's stream
    with eval_mode(model):
        for x, y in _with_bar(batches, "selecting samples", show):
            logits = model(x.to(device))
            y = y.cpu()
            if found.example is None:
                found.example, outputs = x[:1].cpu(), logits.shape[1]
                found.outputs = outputs
                found.seen = found.correct = torch.zeros(outputs, dtype=torch.long)
                wanted = torch.zeros(outputs, dtype=torch.bool)
                if found.classes is None:
                    found.classes = list(range(outputs))
                wanted[[c for c in found.classes if 0 <= c < outputs]] = True
            outputs = int(found.outputs or 0)
            z = logits.detach().to("cpu", torch.float64)  # (B, outputs)
            inside = (y >= 0) & (y < outputs)  # labels the model has an output for
            hit = inside & (z.argmax(1) == y)
            score = log_odds(z, y.clamp(0, outputs - 1))
            found.seen = found.seen + torch.bincount(y[inside], minlength=outputs)
            found.correct = found.correct + torch.bincount(y[hit], minlength=outputs)
            # Only the classes with a correct sample here can change their candidates: with a
            # 1000-class head that is a few hundred per batch, not every class.
            for c in y[hit & wanted[y.clamp(0, outputs - 1)]].unique().tolist():
                ok = hit & (y == c)
                xs = x[ok.to(x.device)].cpu() if best.inputs is not None else None
                best.add(c, score[ok], position + ok.nonzero().flatten(), xs)
            position += len(y)
            if best.nbytes > budget:
                if isinstance(batches, Iterator):
                    raise UserError(
                        f"the candidate samples take more than hold_budget ({budget:,} bytes) and `batches` "
                        "can be read only once: pass a list or a loader (without shuffling), so that the "
                        "selected samples are read again, or lower max_per_class")
                log.info("candidate samples past %s bytes: keeping their positions, reading the batches again",
                         f"{budget:,}")
                best.drop_inputs()
    best.merge()
    return found


def _with_bar(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], desc: str,
              show: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches, counted on a progress bar. The bar is not handed the iterable: tqdm's asyncio
    variant would call `iter` on it twice, which costs a reading of a loader that changes between
    readings and starts a DataLoader's workers twice."""
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, unit="batch", disable=None if show else True) as bar:
        for batch in batches:
            yield batch
            bar.update()


def _read_again(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], positions: dict[int, torch.Tensor],
                progress: bool) -> dict[int, torch.Tensor]:
    """The inputs at `positions` (per class, in this process's stream of samples), from a second
    pass over `batches` that stops after the last one; the labels there must be the classes."""
    if not positions:
        return {}
    flat = torch.cat(list(positions.values()))
    label = torch.cat([torch.full((len(p),), c, dtype=torch.long) for c, p in positions.items()])
    order = flat.argsort()
    flat, label = flat[order], label[order]
    inputs: torch.Tensor | None = None  # in the order of `positions`, filled as the batches pass
    start, i = 0, 0
    for x, y in _with_bar(batches, "reading the selected samples", progress):
        j = int(torch.searchsorted(flat, start + len(y)))
        local = flat[i:j] - start
        if not torch.equal(y.cpu()[local], label[i:j]):
            raise UserError("the batches gave other samples on the second reading (their labels differ): "
                            "turn shuffling off, or raise hold_budget so that the first reading suffices")
        if inputs is None:
            inputs = torch.empty((len(flat), *x.shape[1:]), dtype=x.dtype)
        inputs[order[i:j]] = x[local.to(x.device)].cpu()
        start, i = start + len(y), j
        if i == len(flat):
            break  # the rest holds nothing selected
    if i < len(flat) or inputs is None:
        raise UserError(f"the batches ended after {start:,} samples on the second reading, "
                        f"before the selected sample at position {int(flat[i]):,}")
    sizes = [len(p) for p in positions.values()]
    return dict(zip(positions, inputs.split(sizes)))


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
    present = dict(zip(*(t.tolist() for t in labels.unique(return_counts=True))))  # class -> count
    classes = sorted(present)
    if group is not None:
        classes = sorted(set().union(*distributed.gather(classes, group)))  # type: ignore[arg-type]
    counts = {c: present.get(c, 0) for c in classes}
    if group is not None:
        (counts,) = distributed.sum_counts([counts], classes, group)
    return SampleSelection(inputs, labels, dict(counts), {}, dict(counts), [], example)  # no model: none judged

