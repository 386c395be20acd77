"""Knowledge amalgamation and distillation: the trained baseline of training-free assembly.

MDA assembles components without a gradient step. The classic alternative (knowledge
amalgamation, Shen et al., AAAI 2019) trains a new network, the *student*, on the union of the
teachers' training images **without their labels**, to reproduce the teachers' softened outputs.
For a batch of B images with student logits s and teacher logits t (T = the temperature):

    t(x) = [t_1(x) ; t_2(x) ; ...]        every teacher's logits on its own classes, concatenated
    p = softmax(t / T),  q = softmax(s / T)   (over the C classes of the union)
    L = T² · 1/B · Σ_b Σ_j p_bj · (log p_bj − log q_bj)  =  T² · mean_b KL(p_b ‖ q_b)

Hinton et al.'s distillation loss; the T² keeps gradient sizes comparable across temperatures.
Each teacher reads the union's images through its own input transform (its normalisation, and a
resize only when asked), as it does inside an assembly, so teachers of different datasets (MNIST
and Fashion-MNIST) each see every image as their own data. `distill` is the same loss with one
teacher, e.g. an assembly with its density head, to get one compact network.

The teachers' outputs are computed once (no augmentation), the student is trained with SGD as in
`modellego.training.fit`, and the epoch with the lowest distillation loss on the union's
validation images is kept: the selection needs no label either. Validation accuracy is recorded
for information.

The student is stored like an assembly whose body is one plain zoo network (no layer resized,
the head the identity): its class names and label map are the union's, so `modellego evaluate`,
`modellego.data.union.union_dataset` and `modellego.load` treat it as they treat an assembly.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..assembly.assemble import Assembly, OutputHead
from ..cut.disassemble import check_classes
from ..cut.prune import prune_layers
from ..data import Dataset, Split, batches, channel_stats, load_dataset
from ..data.union import union_dataset
from ..errors import UserError
from ..evaluation.protocol import model_transform
from ..hooks import eval_mode
from ..io.info import INFO_ATTR, AssemblySpec, InputSpec, LabelEntry, ModelInfo, require_info, set_info
from ..models import classifier_layer, create_model
from ..training.fit import FitConfig, autocast_bf16, default_device

log = logging.getLogger(__name__)

Data = Dataset | Mapping[str, Dataset] | None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T² · mean over the batch of KL(softmax(teacher / T) ‖ softmax(student / T)).

    Shape: student (B, C), teacher (B, C) -> a scalar.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise UserError(f"student and teacher logits must both be (B, C); got {tuple(student.shape)} and "
                        f"{tuple(teacher.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"the temperature must be a finite number > 0, got {temperature}")
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def task_teacher(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """The model with its outputs restricted to `classes` (its Masked-Base), as a teacher of those classes.

    No channel is removed: the classifier keeps the rows of `classes` only, which the returned
    module's description records as a pruning plan, so it can be saved and rebuilt like a
    component. `classes` are output indices of `model`, in the order wanted.
    """
    info = require_info(model, "a task teacher")
    if info.assembly is not None:
        raise UserError("task_teacher restricts a model or component; an assembly is a teacher as it is")
    idx = check_classes(classes, info.num_classes)
    name, fc = classifier_layer(model)
    teacher = prune_layers(copy.deepcopy(model), {name: {"out": idx}})
    plan = {k: dict(v) for k, v in (info.pruning or {}).items()}
    kept = plan.get(name, {}).get("out", list(range(fc.out_features)))  # rows of the architecture's classifier
    plan[name] = {**plan.get(name, {}), "out": [kept[i] for i in idx]}
    return set_info(teacher.eval(), info.replace(
        kind="component", classes=tuple(info.classes[i] for i in idx),
        class_names=tuple(info.class_names[i] for i in idx), pruning=plan,
        provenance={"task": [info.classes[i] for i in idx], "restricted": "the classifier's rows of the task only"}))


def _teacher_infos(teachers: Sequence[nn.Module]) -> list[ModelInfo]:
    infos = []
    for i, t in enumerate(teachers):
        info = require_info(t, f"teacher {i}")
        if info.input is None:
            raise UserError(f"teacher {i} has no input description; save it from a trained model")
        infos.append(info)
    return infos


def _union(infos: Sequence[ModelInfo]) -> tuple[tuple[ModelInfo, ...], tuple[LabelEntry, ...]]:
    """The union's components and label map: every teacher's classes in turn (an assembly's flattened).

    Raises:
        UserError: a class without a dataset, or one class predicted by two teachers.
    """
    components: list[ModelInfo] = []
    entries: list[LabelEntry] = []
    owner: dict[tuple[str, int], int] = {}
    for i, info in enumerate(infos):
        if info.assembly is None:
            parts = [info]
            own = [LabelEntry(0, info.dataset, c, n) for c, n in zip(info.classes, info.class_names)]
        else:
            parts, own = list(info.assembly.components), list(info.assembly.label_map)
        for e in own:
            if not e.dataset:
                raise UserError(f"teacher {i} does not record the dataset of its class {e.name!r}; "
                                "amalgamation reads each class's training images from its dataset")
            key = (e.dataset, e.source_class)
            if key in owner:
                raise UserError(f"teachers {owner[key]} and {i} both predict class {e.name!r} of {e.dataset}; "
                                "amalgamation needs teachers of disjoint classes (cut components with "
                                "`modellego disassemble --classes`, or give --classes per teacher)")
            owner[key] = i
            entries.append(LabelEntry(e.component + len(components), e.dataset, e.source_class, e.name))
        components.extend(parts)
    return tuple(components), tuple(entries)


def _datasets(data: Data, label_map: Sequence[LabelEntry], loader: Callable[[str], Dataset]) -> dict[str, Dataset]:
    """The datasets of the union's classes (given or loaded), checked to hold images of one shape."""
    given = {data.name: data} if isinstance(data, Dataset) else dict(data or {})
    names = list(dict.fromkeys(str(e.dataset) for e in label_map))
    out = {n: given[n] if n in given else loader(n) for n in names}
    shapes = {n: "x".join(str(s) for s in ds.train.images.shape[1:]) for n, ds in out.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"the teachers' datasets hold images of different shapes ({', '.join(f'{n} {s}' for n, s in shapes.items())}); "
                        "one student reads one image shape")
    return out


def _student_arch(student: str | None, width: float | None, first: ModelInfo, num_classes: int,
                  channels: int) -> tuple[str, dict]:
    """The student's zoo name and `create_model` arguments; by default the first teacher's architecture."""
    if student is None:
        leaf = first.assembly.components[0] if first.assembly is not None else first
        if leaf.arch is None:
            raise UserError("the first teacher records no zoo architecture; name the student (--student)")
        arch, kwargs = leaf.arch, dict(leaf.arch_kwargs)
        kwargs["width"] = width if width is not None else kwargs.get("width", 1.0)
    else:
        arch, kwargs = student, {"width": width if width is not None else 1.0}
    kwargs.update(num_classes=num_classes, in_channels=channels)
    return arch, kwargs


@torch.no_grad()
def teacher_logits(teachers: Sequence[nn.Module], ds: Dataset, split: str = "train", *, batch_size: int = 512,
                   progress: bool = False) -> torch.Tensor:
    """The amalgamation target of every image of `ds`'s `split`: each teacher's logits, concatenated.

    Each teacher reads the images through its own input transform (`model_transform`: its
    channels, size and normalisation); labels are not read.
    Shape: (N, sum of the teachers' classes), in image order, on the CPU.
    """
    infos = _teacher_infos(teachers)
    transforms = [model_transform(t, ds) for t in teachers]
    outs = []
    with contextlib.ExitStack() as stack:
        for t in teachers:
            stack.enter_context(eval_mode(t))
        for x, _ in tqdm(batches(ds.split(split), batch_size), desc=f"teacher outputs ({split})", leave=False,
                         disable=None if progress else True):
            row = []
            for t, tf, info in zip(teachers, transforms, infos):
                z = t(tf(x).to(next(t.parameters()).device)).float().cpu()  # (B, C_t)
                if z.shape != (len(x), info.num_classes):
                    raise UserError(f"a teacher of {info.num_classes} classes returned logits of shape "
                                    f"{tuple(z.shape)}, expected {(len(x), info.num_classes)}")
                row.append(z)
            outs.append(torch.cat(row, 1))  # (B, C)
    return torch.cat(outs) if outs else torch.zeros(0, sum(i.num_classes for i in infos))


def _indexed(split: Split) -> Split:
    """The split's images with each image's index as its label: the training loop never sees a class."""
    return Split(split.images, torch.arange(len(split)))


class _Student:
    """The student being trained, with the targets of its training and validation images."""

    def __init__(self, model: Assembly, union: Dataset, train: Split, targets: torch.Tensor,
                 val_targets: torch.Tensor, temperature: float, device: torch.device) -> None:
        self.model, self.union, self.train, self.targets = model, union, train, targets
        self.val_targets, self.temperature, self.device = val_targets, temperature, device
        self.transform = model_transform(model, union)

    @torch.no_grad()
    def validate(self, record: dict[str, float]) -> None:
        """Distillation loss (no label) and mean per-class accuracy (for information) on the union's val."""
        if not len(self.union.val):
            return
        labels = self.union.val.labels
        total, preds = 0.0, []
        with eval_mode(self.model):
            for x, idx in batches(_indexed(self.union.val), 512, transform=self.transform):
                s = self.model(x.to(self.device)).float()  # (B, C)
                total += float(distillation_loss(s, self.val_targets[idx].to(self.device), self.temperature)) * len(idx)
                preds.append(s.argmax(1).cpu())
        hit = torch.cat(preds) == labels
        per_class = [hit[labels == j].float().mean() for j in labels.unique()]
        record["val_loss"] = total / len(labels)
        record["val_accuracy"] = 100 * float(torch.stack(per_class).mean())  # mean per class, as evaluate reports

    def fit(self, c: FitConfig, progress: bool) -> tuple[list[dict[str, float]], int]:
        """SGD on the distillation loss; the model ends with the weights of the best validation epoch."""
        model, device = self.model, self.device
        model.to(device)
        if c.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; the stubs omit it
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        it = batches(_indexed(self.train), c.batch_size, transform=self.transform, shuffle=True, seed=c.seed,
                     drop_last=len(self.train) > c.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, c.epochs * len(it))) if c.schedule == "cosine" else None
        first: dict[str, float] = {"epoch": 0}
        self.validate(first)  # the untrained student: what the training gained
        history, best, best_state, best_epoch = [first], math.inf, None, c.epochs
        for epoch in range(c.epochs):
            it.set_epoch(epoch)
            t0 = time.perf_counter()
            model.train()
            total, n = 0.0, 0
            bar = tqdm(it, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, disable=None if progress else True)
            for x, idx in bar:
                x = x.to(device)
                if c.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_bf16(c.bf16, device):
                    s = model(x).float()
                loss = distillation_loss(s, self.targets[idx].to(device), self.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched:
                    sched.step()
                total, n = total + float(loss.detach()) * len(idx), n + len(idx)
                bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
            model.eval()
            record = {"epoch": epoch + 1, "loss": total / max(n, 1), "seconds": time.perf_counter() - t0}
            self.validate(record)
            history.append(record)
            log.info("epoch %d: %s", epoch + 1, record)
            if record.get("val_loss", math.inf) < best:  # without validation images: the last epoch
                best, best_state, best_epoch = record["val_loss"], copy.deepcopy(model.state_dict()), epoch + 1
        if best_state is not None:
            model.load_state_dict(best_state)
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above
        return history, best_epoch


def _train_student(teachers: Sequence[nn.Module], data: Data, *, method: str, student: str | None,
                   width: float | None, config: FitConfig | None, temperature: float, images: int | None,
                   resize: bool, loader: Callable[[str], Dataset], device: torch.device | None,
                   progress: bool) -> Assembly:
    t_start = time.perf_counter()
    c = config or FitConfig()
    if c.epochs < 1:
        raise UserError(f"training a student needs at least one epoch, got {c.epochs}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"the temperature must be a finite number > 0, got {temperature}")
    if images is not None and images < 1:
        raise UserError(f"images must be a positive number of training images, got {images}")
    infos = _teacher_infos(teachers)
    components, label_map = _union(infos)
    if len(label_map) < 2:
        raise UserError(f"the teachers predict {len(label_map)} class; softened outputs over one class teach nothing")
    datasets = _datasets(data, label_map, loader)
    channels, height, width_px = (int(s) for s in next(iter(datasets.values())).train.images.shape[1:])
    for i, info in enumerate(infos):
        assert info.input is not None  # _teacher_infos checked it
        if tuple(info.input.size) != (height, width_px) and not resize:
            raise UserError(f"teacher {i} reads {info.input.size[0]}x{info.input.size[1]} images, the union's are "
                            f"{height}x{width_px}; pass resize=True (--resize) to resize them for it")
    arch, kwargs = _student_arch(student, width, infos[0], len(label_map), channels)
    torch.manual_seed(c.seed)
    body = create_model(arch, **kwargs)
    body.__dict__.pop(INFO_ATTR, None)  # the body is part of the student, which carries the description
    model = Assembly("padded", body, OutputHead([e.component for e in label_map]))
    spec = AssemblySpec("padded", components, label_map, adapters=False, arch=arch, arch_kwargs=kwargs)
    info = ModelInfo(arch=None, arch_kwargs={}, class_names=tuple(e.display_name for e in label_map),
                     classes=tuple(range(len(label_map))), dataset="+".join(datasets), kind="assembly",
                     provenance={"scaling": {"method": "none"}}, assembly=spec)
    union = union_dataset(set_info(model, info), datasets)
    mean, std = channel_stats(union.train.images)
    info = info.replace(input=InputSpec(channels, (height, width_px), mean, std))
    set_info(model, info)

    train = union.train
    if images is not None and images < len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(c.seed))[:images]
        train = train.select(pick.sort().values)
    t0 = time.perf_counter()
    sub = Dataset(union.name, union.classes, train, union.val, union.test, union.mean, union.std)
    targets = teacher_logits(teachers, sub, "train", progress=progress)  # (N, C)
    val_targets = teacher_logits(teachers, sub, "val", progress=progress)
    teacher_s = time.perf_counter() - t0
    device = device or default_device()
    history, best_epoch = _Student(model, union, train, targets, val_targets, temperature, device).fit(c, progress)
    best = history[best_epoch]
    record = {
        "method": method, "temperature": temperature, "student": {"arch": arch, "width": kwargs["width"]},
        "teachers": [{"kind": i.kind, "arch": i.arch if i.assembly is None else (i.assembly.arch or "parallel"),
                      "dataset": i.dataset, "classes": list(i.class_names)} for i in infos],
        "config": asdict(c), "train_images": len(train), "resize": resize, "history": history,
        "best_epoch": best_epoch, "val_loss": best.get("val_loss"), "val_accuracy": best.get("val_accuracy"),
        "teacher_seconds": teacher_s, "seconds": time.perf_counter() - t_start, "device": str(device),
        "threads": torch.get_num_threads()}
    set_info(model, info.replace(provenance={**info.provenance, "amalgamation": record}))
    return model.eval()


def amalgamate(
    teachers: Sequence[nn.Module],
    data: Data = None,
    *,
    student: str | None = None,
    width: float | None = None,
    config: FitConfig | None = None,
    temperature: float = 4.0,
    images: int | None = None,
    resize: bool = False,
    loader: Callable[[str], Dataset] = load_dataset,
    device: torch.device | None = None,
    progress: bool = True,
) -> Assembly:
    """Knowledge amalgamation: one student for the union of the teachers' classes, trained without labels.

    The student learns to match every teacher's softened logits on the union's training images
    (`distillation_loss`, the module docstring has the formula); the epoch with the lowest
    distillation loss on the union's validation images is kept.

    Args:
        teachers: two or more models, components or assemblies with descriptions, of disjoint
            classes (a full model's classes are all its outputs; `task_teacher` restricts them).
        data: the datasets of the teachers' classes (one `Dataset`, or datasets by name); the
            missing ones are read with `loader`.
        student: zoo name of the student (default: the first teacher's architecture).
        width: the student's width multiplier (default: the first teacher's when the student is
            its architecture, else 1).
        config: epochs, batch size and the SGD recipe (`FitConfig`; its seed seeds the student's
            initialisation, the image order and the `images` draw).
        temperature: T of the softmax (Shen et al. and Hinton et al. use 4 and 2-20).
        images: train on this many seeded random images of the union's training split (default all).
        resize: let teachers of another input size read the images resized to it.
        device: where the student trains (default: CUDA when available); teachers run where they are.
    Returns: the student as a one-body `Assembly` in eval mode: its class names and label map are
        the union's, and its provenance (``"amalgamation"``) holds the history and the timings.

    Raises:
        UserError: fewer than two teachers, a class predicted by two teachers, datasets of
            different image shapes, an input size mismatch without `resize`.
    """
    if len(teachers) < 2:
        raise UserError(f"amalgamation needs at least two teachers, got {len(teachers)}; "
                        "distill one teacher with `distill` (`modellego distill`)")
    return _train_student(teachers, data, method="amalgamation", student=student, width=width, config=config,
                          temperature=temperature, images=images, resize=resize, loader=loader, device=device,
                          progress=progress)


def distill(
    teacher: nn.Module,
    data: Data = None,
    *,
    student: str | None = None,
    width: float | None = None,
    config: FitConfig | None = None,
    temperature: float = 4.0,
    images: int | None = None,
    resize: bool = False,
    loader: Callable[[str], Dataset] = load_dataset,
    device: torch.device | None = None,
    progress: bool = True,
) -> Assembly:
    """Distillation: one compact student of one teacher's classes, from its softened outputs alone.

    The loss and the arguments are `amalgamate`'s; the teacher is typically an assembly (with its
    density head, whose outputs are then the targets), or a model to compress.
    """
    return _train_student([teacher], data, method="distillation", student=student, width=width, config=config,
                          temperature=temperature, images=images, resize=resize, loader=loader, device=device,
                          progress=progress)
