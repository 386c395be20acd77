"""What a model file says about its model: architecture, classes, input, pruning, provenance.

A `ModelInfo` travels with every model the library builds or loads, as the attribute
``model.modellego_info``. It is plain JSON-able data: files store it, code rebuilds from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .errors import UserError

INFO_ATTR = "modellego_info"


@dataclass(frozen=True)
class InputSpec:
    """The input a model expects: channels, image size and the normalisation applied before it."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        return cls(int(d["channels"]), (int(d["size"][0]), int(d["size"][1])),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


@dataclass(frozen=True)
class ModelInfo:
    """Everything needed to rebuild a model and to interpret its outputs.

    Attributes:
        arch: zoo architecture name (``None`` for a model the zoo cannot rebuild).
        arch_kwargs: arguments of `modellego.models.create_model`.
        class_names: name of each output, in output order.
        classes: index of each output in the source model's classes (identity for a source model).
        input: expected input, or ``None`` if unknown.
        dataset: name of the dataset the classes come from.
        kind: "model", "component" or "assembly".
        pruning: per layer name, kept output/input indices ({"out": [...], "in": [...]}).
        provenance: free-form JSON: training arguments, accuracies, thresholds, samples used.
        assembly: for an assembly, how to rebuild it: mode, layer sizes, input adapters and the
            descriptions of its components (see `modellego.assemble`).
    """

    arch: str | None
    arch_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    classes: tuple[int, ...]
    input: InputSpec | None = None
    dataset: str | None = None
    kind: str = "model"
    pruning: dict[str, dict[str, list[int]]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    assembly: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.classes):
            raise UserError(f"{len(self.class_names)} class names for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> ModelInfo:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "class_names": list(self.class_names),
            "classes": list(self.classes),
            "input": self.input.to_json() if self.input else None,
            "dataset": self.dataset,
            "kind": self.kind,
            "pruning": self.pruning,
            "provenance": self.provenance,
            "assembly": self.assembly,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        try:
            return cls(
                arch=d["arch"],
                arch_kwargs=dict(d["arch_kwargs"]),
                class_names=tuple(str(n) for n in d["class_names"]),
                classes=tuple(int(c) for c in d["classes"]),
                input=InputSpec.from_json(d["input"]) if d.get("input") else None,
                dataset=d.get("dataset"),
                kind=str(d.get("kind", "model")),
                pruning=d.get("pruning"),
                provenance=dict(d.get("provenance") or {}),
                assembly=d.get("assembly"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"model description is malformed: {e!r}") from e


def get_info(model: nn.Module) -> ModelInfo | None:
    """The `ModelInfo` attached to `model`, or ``None``."""
    return getattr(model, INFO_ATTR, None)


def set_info(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Attach `info` to `model` (returns the model)."""
    object.__setattr__(model, INFO_ATTR, info)
    return model


def require_info(model: nn.Module, what: str) -> ModelInfo:
    info = get_info(model)
    if info is None:
        raise UserError(
            f"{what} needs a model built by modellego (create_model, load or disassemble); "
            f"attach a description with modellego.info.set_info(model, ModelInfo(...))"
        )
    return info
