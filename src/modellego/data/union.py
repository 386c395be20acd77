"""The union task of an assembly: test and training images of all its classes, relabelled."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from ..io.info import LabelEntry, require_info
from .dataset import Dataset, Split, load_dataset


def _relabel(label_map: Sequence[LabelEntry], datasets: Mapping[str, Dataset], split: str) -> Split:
    images, labels = [], []
    for j, entry in enumerate(label_map):
        ds = datasets[str(entry.dataset)]
        part = ds.split(split)
        hit = part.labels == entry.source_class
        images.append(part.images[hit])
        labels.append(torch.full((int(hit.sum()),), j, dtype=torch.long))
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise UserError(f"the datasets' images differ in shape ({sorted(shapes)}); evaluate each part separately")
    return Split(torch.cat(images), torch.cat(labels))


def union_dataset(assembly: nn.Module, datasets: Mapping[str, Dataset] | None = None,
                  loader: Callable[[str], Dataset] = load_dataset) -> Dataset:
    """A `Dataset` whose classes are the assembly's outputs (labels = output indices).

    Args:
        assembly: an assembly (its label map names each output's dataset and class).
        datasets: datasets by name; missing ones are loaded with `loader`.
    """
    info = require_info(assembly, "the union task")
    if info.assembly is None:
        raise UserError("the model is not an assembly (no label map)")
    label_map = info.assembly.label_map
    datasets = dict(datasets or {})
    for entry in label_map:
        name = entry.dataset
        if not name:
            raise UserError("a component does not record its dataset; pass the datasets explicitly")
        if name not in datasets:
            datasets[name] = loader(name)
    first = datasets[str(label_map[0].dataset)]
    return Dataset(
        name=info.dataset or "union", classes=tuple(info.class_names),
        train=_relabel(label_map, datasets, "train"), val=_relabel(label_map, datasets, "val"),
        test=_relabel(label_map, datasets, "test"), mean=first.mean, std=first.std)
