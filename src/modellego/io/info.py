"""What a model file says about its model: architecture, classes, input, pruning, provenance.

A `ModelInfo` travels with every model the library builds or loads, as the attribute
``model.modellego_info``. It is plain JSON-able data: files store it, code rebuilds from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn as nn

from ..errors import UserError
from .plan import Plan

INFO_ATTR = "modellego_info"
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


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


MODES = ("padded", "parallel")


@dataclass(frozen=True)
class LabelEntry:
    """One output of an assembly: the component it comes from and that component's source class."""

    component: int
    dataset: str | None
    source_class: int
    name: str

    @property
    def display_name(self) -> str:
        return f"{self.dataset}:{self.name}" if self.dataset else self.name

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "dataset": self.dataset, "source_class": self.source_class,
                "name": self.name}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LabelEntry:
        dataset = d.get("dataset")
        return cls(int(d["component"]), None if dataset is None else str(dataset), int(d["source_class"]),
                   str(d["name"]))


@dataclass(frozen=True)
class DensitySite:
    """Shapes of one Gaussian of the density head: its component, body layer, features and classes."""

    component: int
    layer: str
    features: int
    classes: int

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "layer": self.layer, "features": self.features, "classes": self.classes}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DensitySite:
        return cls(int(d["component"]), str(d["layer"]), int(d["features"]), int(d["classes"]))


@dataclass(frozen=True)
class AssemblySpec:
    """How an assembly is built from its components.

    Attributes:
        mode: ``padded`` (one block-diagonal body) or ``parallel`` (components side by side).
        components: each component's description, in output-group order.
        label_map: one entry per output of the assembly, in output order.
        adapters: whether each component reads its own normalised copy of the raw image.
        arch, arch_kwargs: the zoo architecture the padded body is resized from.
        layer_sizes: padded body, per layer name, its new widths (``{"out": n, "in": m}``).
        layer_inputs: padded body, per layer, each component's feature positions in its input.
        density: the density head's sites, once `scale_assembly(method="density")` fitted one.
    """

    mode: str
    components: tuple[ModelInfo, ...]
    label_map: tuple[LabelEntry, ...]
    adapters: bool = False
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    layer_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    layer_inputs: dict[str, list[list[int]]] = field(default_factory=dict)
    density: tuple[DensitySite, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown assembly mode {self.mode!r}; expected one of {', '.join(MODES)}")
        bad = [e.component for e in self.label_map if not 0 <= e.component < len(self.components)]
        if bad:
            raise UserError(f"label map names components {bad} of an assembly of {len(self.components)}")

    @property
    def groups(self) -> list[int]:
        """Component index of every output."""
        return [e.component for e in self.label_map]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mode": self.mode,
            "components": [c.to_json() for c in self.components],
            "label_map": [e.to_json() for e in self.label_map],
            "adapters": self.adapters,
        }
        if self.mode == "padded":
            d.update(arch=self.arch, arch_kwargs=self.arch_kwargs, layer_sizes=self.layer_sizes,
                     layer_inputs=self.layer_inputs)
        if self.density is not None:
            d["density"] = [s.to_json() for s in self.density]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AssemblySpec:
        density = d.get("density")
        return cls(
            mode=str(d["mode"]),
            components=tuple(ModelInfo.from_json(c) for c in d["components"]),
            label_map=tuple(LabelEntry.from_json(e) for e in d["label_map"]),
            adapters=bool(d.get("adapters", False)),
            arch=d.get("arch"),
            arch_kwargs=dict(d.get("arch_kwargs") or {}),
            layer_sizes={str(k): {str(a): int(n) for a, n in v.items()} for k, v in (d.get("layer_sizes") or {}).items()},
            layer_inputs={str(k): [[int(i) for i in p] for p in v] for k, v in (d.get("layer_inputs") or {}).items()},
            density=None if density is None else tuple(DensitySite.from_json(s) for s in density),
        )


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
        assembly: for an assembly, how to rebuild it (`AssemblySpec`).
    """

    arch: str | None
    arch_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    classes: tuple[int, ...]
    input: InputSpec | None = None
    dataset: str | None = None
    kind: str = "model"
    pruning: Plan | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    assembly: AssemblySpec | None = None

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
            "assembly": self.assembly.to_json() if self.assembly else None,
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
                assembly=_assembly_from_json(d),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"model description is malformed: {e!r}") from e


def _assembly_from_json(d: Mapping[str, Any]) -> AssemblySpec | None:
    spec = d.get("assembly")
    if spec is None:
        return None
    if "label_map" not in spec:  # format 1 kept the label map in the provenance
        spec = {**spec, "label_map": (d.get("provenance") or {})["label_map"]}
    return AssemblySpec.from_json(spec)


def get_info(model: nn.Module) -> ModelInfo | None:
    """The `ModelInfo` attached to `model`, or ``None``."""
    return getattr(model, INFO_ATTR, None)


def set_info(model: _ModuleT, info: ModelInfo) -> _ModuleT:
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


def class_names_of(model: nn.Module, num_classes: int) -> list[str]:
    info = get_info(model)
    return list(info.class_names) if info else [str(i) for i in range(num_classes)]


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of `tensors`, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
