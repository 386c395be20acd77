"""The evaluation protocol: Base, Masked-Base and Disa on a task, with sizes (mda-method §6)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..data import Dataset, Resize, batches, preprocessing
from ..data.stream import StreamedBatches, StreamedImageFolder
from ..data.transforms import Compose
from ..errors import UserError
from ..io.info import InputSpec, get_info
from .metrics import Accuracy, accuracy, count_flops, count_params


def model_transform(model: nn.Module, ds: Dataset):
    """Preprocessing that turns `ds` images into what `model` expects (channels, size, normalisation)."""
    info = get_info(model)
    spec = info.input if info and info.input else InputSpec(ds.in_channels, ds.image_size, ds.mean, ds.std)
    if spec.channels not in (ds.in_channels, 3) or (spec.channels == 3 and ds.in_channels not in (1, 3)):
        raise UserError(f"the model expects {spec.channels}-channel input; {ds.name} has {ds.in_channels} channels")
    t = preprocessing(spec.mean, spec.std, in_channels=3 if spec.channels == 3 and ds.in_channels == 1 else None)
    if tuple(spec.size) != tuple(ds.image_size):
        t = Compose([Resize(spec.size), t])
    return t


def model_stream(
    model: nn.Module,
    root: str | os.PathLike[str] | StreamedImageFolder,
    split: str = "train",
    *,
    batch_size: int = 256,
    workers: int = 0,
    resize: int | None = None,
    classes: Sequence[int] | None = None,
    shard: tuple[int, int] | None = None,
) -> StreamedBatches:
    """The `split` of the image folder `root`, decoded image by image and preprocessed for `model`.

    The model's input spec gives the channels, the center crop's side and the normalisation (see
    `modellego.data.stream` for the layout and the transform); labels are the folder's class indices.

    Shape:
        yields images (B, C, S, S) float32 and labels (B,) int64, S the model's input side.
    """
    folder = root if isinstance(root, StreamedImageFolder) else model_folder(model, root, split, resize=resize)
    return StreamedBatches(folder, batch_size, workers=workers, classes=classes, shard=shard)


def model_folder(model: nn.Module, root: str | os.PathLike[str], split: str = "train", *,
                 resize: int | None = None) -> StreamedImageFolder:
    """The listing of `split` of the image folder `root`, with `model`'s transform; `model_stream`
    takes it in place of `root`, so that several passes over one folder walk its tree once."""
    info = get_info(model)
    if info is None or info.input is None:
        raise UserError("streaming an image folder needs the model's input spec (channels, size, mean, std); "
                        "models trained or saved by modellego record it")
    spec = info.input
    if spec.size[0] != spec.size[1] or spec.channels not in (1, 3):
        raise UserError(f"streamed folders give square 1- or 3-channel images; the model expects "
                        f"{spec.channels} x {spec.size[0]} x {spec.size[1]}")
    return StreamedImageFolder(root, split, size=spec.size[0], resize=resize, channels=spec.channels,
                               mean=spec.mean, std=spec.std)


def input_shape(model: nn.Module, ds: Dataset) -> tuple[int, int, int]:
    info = get_info(model)
    if info and info.input:
        return (info.input.channels, *info.input.size)
    return (ds.in_channels, *ds.image_size)


def test_accuracy(model: nn.Module, ds: Dataset, classes: Sequence[int] | None = None, *, restrict: bool = False,
                  split: str = "test", batch_size: int = 512) -> Accuracy:
    """Accuracy of `model` on the `split` images of `classes`, preprocessed for the model."""
    task = list(classes) if classes is not None else None
    it = batches(ds.split(split), batch_size, transform=model_transform(model, ds), classes=task,
                 device=next(model.parameters()).device)
    return accuracy(model, it, classes=task, restrict=restrict)


@dataclass
class TaskReport:
    """One row of Table 1: a component against its source on the task's test images."""

    classes: list[int]
    base: Accuracy
    masked_base: Accuracy
    disa: Accuracy
    params: float
    flops: float

    def row(self) -> dict[str, object]:
        return {
            "classes": self.classes,
            "base": round(self.base.mean_per_class, 2),
            "masked_base": round(self.masked_base.mean_per_class, 2),
            "disa": round(self.disa.mean_per_class, 2),
            "worst_masked_base": round(self.masked_base.worst_class, 2),
            "worst_disa": round(self.disa.worst_class, 2),
            "params_pct": round(100 * self.params, 2),
            "flops_pct": round(100 * self.flops, 2),
        }


def compare(source: nn.Module, component: nn.Module, ds: Dataset, split: str = "test") -> TaskReport:
    """Base (argmax over all classes), Masked-Base (argmax over the task) and Disa, plus sizes."""
    info = get_info(component)
    if info is None:
        raise UserError("the component has no description (classes unknown)")
    task = list(info.classes)
    shape = input_shape(source, ds)
    return TaskReport(
        classes=task,
        base=test_accuracy(source, ds, task, split=split),
        masked_base=test_accuracy(source, ds, task, restrict=True, split=split),
        disa=test_accuracy(component, ds, task, split=split),
        params=count_params(component) / count_params(source),
        flops=count_flops(component, shape) / count_flops(source, shape),
    )


def calibration_batches(model: nn.Module, ds: Dataset, classes: Sequence[int], *, images: int = 2000,
                        seed: int = 0, batch_size: int = 256) -> list[tuple]:
    """A seeded random draw of `images` TRAINING images of `classes`, preprocessed for `model`."""
    sub = ds.train.subset(list(classes))
    if len(sub) == 0:
        raise UserError(f"no training image of classes {list(classes)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(sub), generator=g)[:images]
    return list(batches(sub.select(idx), batch_size, transform=model_transform(model, ds)))


def scaling_batches(model: nn.Module, ds: Dataset, *, per_class: int = 200, seed: int = 0,
                    batch_size: int = 256) -> list[tuple]:
    """Up to `per_class` seeded random TRAINING images of every class of `ds`, preprocessed for `model`."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(len(ds.classes)):
        idx = torch.nonzero(ds.train.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return list(batches(ds.train.select(torch.cat(picks)), batch_size, transform=model_transform(model, ds)))
