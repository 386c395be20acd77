"""Training source models (the paper's recipe by default) and fine-tuning."""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Dataset, Split, augmentation, batches, default_augmentation, load_dataset, preprocessing
from ..errors import UserError
from ..evaluation.metrics import accuracy
from ..io.info import InputSpec, get_info, require_info, set_info
from ..models import create_model

log = logging.getLogger(__name__)

# An image transform: (images, generator=None) -> images, as `modellego.data` builds them.
Transform = Callable[..., torch.Tensor]


@dataclass
class FitConfig:
    """How `fit` optimises: SGD with momentum, a cosine or constant schedule (the paper's recipe)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@dataclass
class TrainConfig(FitConfig):
    """Every knob of a training run of a zoo model: what to train on, and how (`FitConfig`)."""

    model: str = "lenet5"
    width: float = 1.0
    data: str = "mnist"
    data_dir: str | None = None
    augment: str = "auto"
    val_fraction: float = 0.1
    train_limit: int | None = None
    device: str | None = None


def default_device(device: str | None = None) -> torch.device:
    """`device` checked (a name torch knows, CUDA present when asked for), or CUDA when available, else the CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r} is not supported: use cpu or cuda")
    return d


def input_pipeline(info_input: InputSpec):
    """The evaluation transform of a model's input description."""
    return preprocessing(info_input.mean, info_input.std)


def autocast_bf16(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _label_lookup(label_map: dict[int, int]) -> torch.Tensor:
    """Source label -> output index as a gather table; unmapped labels get cross-entropy's ignore index."""
    lookup = torch.full((max(label_map) + 1,), -100, dtype=torch.long)
    for src, out in label_map.items():
        lookup[src] = out
    return lookup


def _train_epoch(model: nn.Module, bar: tqdm, c: FitConfig, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler | None, lookup: torch.Tensor | None, device: torch.device) -> float:
    """One pass of SGD over `bar`; returns the mean training loss."""
    model.train()
    total, n = 0.0, 0
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        if lookup is not None:
            y = lookup[y]
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_bf16(c.bf16, device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
    return total / max(n, 1)


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    config: FitConfig,
    *,
    transform_train: Transform,
    transform_eval: Transform,
    classes: Sequence[int] | None = None,
    label_map: dict[int, int] | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    keep_initial: bool = False,
) -> list[dict[str, float]]:
    """Train `model` in place with SGD; keep the weights of the best validation epoch.

    Args:
        config: epochs, optimiser and schedule.
        transform_train: augmentation of the raw training images, before `transform_eval`.
        transform_eval: the model's input transform (normalisation).
        classes: train only on samples of these source classes.
        label_map: source class -> output index (for components and assemblies).
        keep_initial: the weights before training compete too (epoch 0), so the result is never
            worse on validation than the model given.
    Returns: one record per epoch (loss, validation accuracy, seconds).
    """
    c = config
    device = device or default_device()
    model.to(device)
    if c.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; the stubs omit it
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    it = batches(train, c.batch_size, transform=lambda x, generator=None: transform_eval(transform_train(x, generator)),
                 shuffle=True, seed=c.seed, classes=classes, drop_last=len(train) > c.batch_size)
    steps = max(1, c.epochs * len(it))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if c.schedule == "cosine" else None
    lookup = _label_lookup(label_map).to(device) if label_map else None
    history: list[dict[str, float]] = []
    best_acc, best_state = -1.0, None
    validate = val is not None and len(val) > 0

    def val_accuracy() -> float:
        assert val is not None  # called only when validate
        return accuracy(model, batches(val, 512, transform=transform_eval, classes=classes), classes=classes).overall

    if keep_initial and validate:  # training that only makes things worse gives the model back unchanged
        best_acc, best_state = val_accuracy(), copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val_accuracy": best_acc})
    for epoch in range(c.epochs):
        it.set_epoch(epoch)
        t0 = time.perf_counter()
        bar = tqdm(it, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, disable=None if progress else True)
        loss = _train_epoch(model, bar, c, opt, sched, lookup, device)
        record = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - t0}
        if validate:
            record["val_accuracy"] = val_accuracy()
            if record["val_accuracy"] > best_acc:
                best_acc, best_state = record["val_accuracy"], copy.deepcopy(model.state_dict())
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, record)
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def train(config: TrainConfig, *, dataset: Dataset | None = None, progress: bool = True) -> nn.Module:
    """Train a zoo model on a dataset; returns it with a full `ModelInfo` (accuracies included)."""
    torch.manual_seed(config.seed)
    device = default_device(config.device)
    ds = dataset or load_dataset(config.data, config.data_dir, val_fraction=config.val_fraction,
                                 seed=config.seed, train_limit=config.train_limit)
    model = create_model(config.model, num_classes=ds.num_classes, in_channels=ds.in_channels, width=config.width)
    augment = default_augmentation(ds.name) if config.augment == "auto" else config.augment
    spec = InputSpec(ds.in_channels, ds.image_size, tuple(ds.mean), tuple(ds.std))
    t_eval = input_pipeline(spec)
    history = fit(model, ds.train, ds.val, config, transform_train=augmentation(augment), transform_eval=t_eval,
                  device=device, progress=progress)
    model = model.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # as above
    test = accuracy(model, batches(ds.test, 512, transform=t_eval))
    val_best = max((h.get("val_accuracy", 0.0) for h in history), default=None)
    info = require_info(model, "training").replace(
        class_names=tuple(ds.classes), input=spec, dataset=ds.name,
        provenance={"training": {**asdict(config), "augment": augment}, "history": history,
                    "val_accuracy": val_best, "test_accuracy": test.overall,
                    "test_mean_per_class": test.mean_per_class, "device": str(device),
                    "threads": torch.get_num_threads()})
    set_info(model, info)
    return model


def finetune(model: nn.Module, ds: Dataset, *, epochs: int, lr: float = 0.01, batch_size: int = 128, seed: int = 0,
             device: torch.device | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Fine-tune a component or assembly in place on `ds` (labels = the model's output classes).

    The paper's Score2 is measured after this (10 epochs there). The best validation epoch is kept,
    the weights given included: fine-tuning never returns a model worse on validation.
    """
    from ..evaluation.protocol import model_transform
    if epochs < 1:
        raise UserError(f"fine-tuning needs at least one epoch, got {epochs}")
    config = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    history = fit(model, ds.train, ds.val, config, transform_train=augmentation("none"),
                  transform_eval=model_transform(model, ds), device=device or next(model.parameters()).device,
                  progress=progress, keep_initial=True)
    info = get_info(model)
    if info is not None:
        record = {"epochs": epochs, "lr": lr, "history": history}
        set_info(model, info.replace(provenance={**info.provenance, "finetune": record}))
    return history
