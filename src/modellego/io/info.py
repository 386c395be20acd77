"""What a model file says about its model: architecture, classes, input, pruning, provenance.

A `ModelInfo` travels with every model the library builds or loads, as the attribute
``model.modellego_info``. It is plain JSON-able data: files store it, code rebuilds from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import torch
import torch.nn as nn

from ..errors import UserError
from .plan import Plan

INFO_ATTR = "modellego_info"
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)

# Bounds on what a description may say, checked by `from_json` before anything is built from it.
MAX_CLASSES = 1_000_000  # classes of a model (the zoo builds one name per class)
MAX_CHANNELS = 65_536  # input image channels
MAX_IMAGE_SIDE = 16_384  # input height or width
MAX_WIDTH = 64.0  # zoo width multiplier
MAX_INDEX = 2**31 - 1  # any channel, feature or layer size
MAX_NAME = 1_000  # characters of a name
KINDS = ("model", "component", "assembly")


# --- Checked reading of JSON values: each failure names where it is and what was expected -------------


def _fail(where: str, expected: str, got: Any) -> NoReturn:
    raise UserError(f"malformed model description: {where}: expected {expected}, got {_show(got)}")


def _show(v: Any) -> str:
    """A short rendering of a JSON value for an error message (never the whole of a long one)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v) if v.bit_length() <= 64 else f"an integer of about {int(v.bit_length() * 0.30103)} digits"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else repr(v[:37]) + "..."
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return f"an object of {len(v)} keys"
    return type(v).__name__


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise UserError(f"malformed model description: {where}.{key} is missing")
    return d[key]


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        _fail(where, "an object", v)
    return v


def _list(v: Any, where: str, *, size: int | None = None, nonempty: bool = False) -> list[Any]:
    if not isinstance(v, list):
        _fail(where, "a list", v)
    if size is not None and len(v) != size:
        _fail(where, f"a list of {size}", v)
    if nonempty and not v:
        _fail(where, "a non-empty list", v)
    return v


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_INDEX) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(where, f"an integer in [{lo}, {hi}]", v)
    return v


def _ints(v: Any, where: str, lo: int = 0, hi: int = MAX_INDEX, *, unique: bool = False) -> list[int]:
    out = [_int(x, f"{where}[{i}]", lo, hi) for i, x in enumerate(_list(v, where))]
    if unique and len(set(out)) != len(out):
        _fail(where, "distinct integers", v)
    return out


def _float(v: Any, where: str, *, positive: bool = False, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        _fail(where, "a number", v)
    try:
        x = float(v)
    except OverflowError:  # an integer beyond the float range
        x = math.inf
    if not math.isfinite(x) or (positive and x <= 0) or x > hi:
        _fail(where, (f"a number in (0, {hi:g}]" if hi < math.inf else "a finite number > 0") if positive
              else "a finite number", v)
    return x


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_NAME:
        _fail(where, f"a string of at most {MAX_NAME} characters", v)
    return v


def _opt_str(v: Any, where: str) -> str | None:
    return None if v is None else _str(v, where)


def _opt_obj(d: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """An optional object field: absent or null reads as empty."""
    v = d.get(key)
    return {} if v is None else _obj(v, f"{where}.{key}")


def _arch_kwargs(v: Any, where: str) -> dict[str, Any]:
    """`create_model` arguments: the common ones bounded, any other a JSON scalar (the factory checks it)."""
    d = _obj(v, where)
    out: dict[str, Any] = {}
    for k, x in d.items():
        at = f"{where}.{k}"
        if k == "num_classes":
            out[k] = _int(x, at, 1, MAX_CLASSES)
        elif k == "in_channels":
            out[k] = _int(x, at, 1, MAX_CHANNELS)
        elif k == "width":
            out[k] = _float(x, at, positive=True, hi=MAX_WIDTH)
        elif x is None or isinstance(x, bool | str):
            out[k] = x
        elif isinstance(x, int):
            out[k] = _int(x, at, -MAX_INDEX, MAX_INDEX)
        elif isinstance(x, float):
            out[k] = _float(x, at)
        else:
            _fail(at, "a number, string, boolean or null", x)
    return out


def _plan(v: Any, where: str) -> Plan | None:
    if v is None:
        return None
    plan: Plan = {}
    for name, dims in _obj(v, where).items():
        at = f"{where}[{name!r}]"
        dims = _obj(dims, at)
        extra = sorted(set(dims) - {"out", "in"})
        if extra:
            _fail(at, "only the keys 'out' and 'in'", extra[0])
        plan[_str(name, at)] = {d: _ints(idx, f"{at}.{d}", unique=True) for d, idx in dims.items()}
    return plan


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
    def from_json(cls, d: Any, where: str = "input") -> InputSpec:
        d = _obj(d, where)
        channels = _int(_get(d, "channels", where), f"{where}.channels", 1, MAX_CHANNELS)
        size = _list(_get(d, "size", where), f"{where}.size", size=2)
        mean = _list(_get(d, "mean", where), f"{where}.mean", size=channels)
        std = _list(_get(d, "std", where), f"{where}.std", size=channels)
        return cls(channels, (_int(size[0], f"{where}.size[0]", 1, MAX_IMAGE_SIDE),
                              _int(size[1], f"{where}.size[1]", 1, MAX_IMAGE_SIDE)),
                   tuple(_float(v, f"{where}.mean[{i}]") for i, v in enumerate(mean)),
                   tuple(_float(v, f"{where}.std[{i}]", positive=True) for i, v in enumerate(std)))


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
    def from_json(cls, d: Any, where: str = "label entry") -> LabelEntry:
        d = _obj(d, where)
        return cls(_int(_get(d, "component", where), f"{where}.component"), _opt_str(d.get("dataset"), f"{where}.dataset"),
                   _int(_get(d, "source_class", where), f"{where}.source_class", 0, MAX_CLASSES),
                   _str(_get(d, "name", where), f"{where}.name"))


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
    def from_json(cls, d: Any, where: str = "density site") -> DensitySite:
        d = _obj(d, where)
        return cls(_int(_get(d, "component", where), f"{where}.component"), _str(_get(d, "layer", where), f"{where}.layer"),
                   _int(_get(d, "features", where), f"{where}.features", 1),
                   _int(_get(d, "classes", where), f"{where}.classes", 1, MAX_CLASSES))


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
    def from_json(cls, d: Any, where: str = "assembly") -> AssemblySpec:
        """The spec `to_json` wrote, every field checked (types, bounds, component indices).

        Raises:
            UserError: a malformed spec; the message names the field.
        """
        d = _obj(d, where)
        mode = _get(d, "mode", where)
        if mode not in MODES:
            _fail(f"{where}.mode", " or ".join(repr(m) for m in MODES), mode)
        comps = _list(_get(d, "components", where), f"{where}.components", nonempty=True)
        components = tuple(ModelInfo.from_json(c, f"{where}.components[{i}]") for i, c in enumerate(comps))
        entries = _list(_get(d, "label_map", where), f"{where}.label_map", nonempty=True)
        label_map = tuple(LabelEntry.from_json(e, f"{where}.label_map[{j}]") for j, e in enumerate(entries))
        # The label map lists each component's classes in turn (`assemble` builds it so): anything
        # else would attach outputs to the wrong classes.
        want = [(i, c) for i, info in enumerate(components) for c in info.classes]
        got = [(e.component, e.source_class) for e in label_map]
        if got != want:
            bad = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise UserError(f"malformed model description: {where}.label_map[{bad}] does not list the components' "
                            f"classes in order ({len(got)} entries for {len(want)} classes)")
        adapters = d.get("adapters", False)
        if not isinstance(adapters, bool):
            _fail(f"{where}.adapters", "true or false", adapters)
        sizes: dict[str, dict[str, int]] = {}
        for name, size in _opt_obj(d, "layer_sizes", where).items():
            at = f"{where}.layer_sizes[{name!r}]"
            size = _obj(size, at)
            if "out" not in size or set(size) - {"out", "in"}:
                _fail(at, "the keys 'out' and optionally 'in'", size)
            sizes[_str(name, at)] = {k: _int(n, f"{at}.{k}", 1) for k, n in size.items()}
        inputs: dict[str, list[list[int]]] = {}
        for name, pos in _opt_obj(d, "layer_inputs", where).items():
            at = f"{where}.layer_inputs[{name!r}]"
            inputs[_str(name, at)] = [_ints(p, f"{at}[{i}]") for i, p in enumerate(_list(pos, at, size=len(components)))]
        density = d.get("density")
        sites = None
        if density is not None:
            sites = tuple(DensitySite.from_json(s, f"{where}.density[{k}]") for k, s in enumerate(_list(density, f"{where}.density")))
            for k, site in enumerate(sites):
                if site.component >= len(components):
                    _fail(f"{where}.density[{k}].component", f"a component index below {len(components)}", site.component)
        arch = _opt_str(d.get("arch"), f"{where}.arch")
        if mode == "padded" and arch is None:
            _fail(f"{where}.arch", "the architecture of the padded body", None)
        return cls(mode=mode, components=components, label_map=label_map, adapters=adapters, arch=arch,
                   arch_kwargs=_arch_kwargs(_opt_obj(d, "arch_kwargs", where), f"{where}.arch_kwargs"),
                   layer_sizes=sizes, layer_inputs=inputs, density=sites)


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
    def from_json(cls, d: Any, where: str = "model") -> ModelInfo:
        """The description `to_json` wrote, every field checked: types, bounds, matching lengths.

        Only the description itself is checked here; whether it fits an architecture (layer
        names, index ranges) is `modellego.files`' check when it builds the module.

        Raises:
            UserError: a malformed description; one line naming the field, e.g.
                ``model.input.size[0]: expected an integer in [1, 16384], got '28'``.
        """
        d = _obj(d, where)
        names = _list(_get(d, "class_names", where), f"{where}.class_names", nonempty=True)
        classes = _ints(_get(d, "classes", where), f"{where}.classes", 0, MAX_CLASSES - 1, unique=True)
        if len(names) != len(classes):
            raise UserError(f"malformed model description: {where}: {len(names)} class names for {len(classes)} classes")
        kind = d.get("kind", "model")
        if kind not in KINDS:
            _fail(f"{where}.kind", " or ".join(repr(k) for k in KINDS), kind)
        provenance = _opt_obj(d, "provenance", where)
        assembly = d.get("assembly")
        if assembly is not None and "label_map" not in _obj(assembly, f"{where}.assembly"):
            # format 1 kept the label map in the provenance
            assembly = {**assembly, "label_map": _get(provenance, "label_map", f"{where}.provenance")}
        spec = None if assembly is None else AssemblySpec.from_json(assembly, f"{where}.assembly")
        if spec is not None and len(spec.label_map) != len(classes):
            raise UserError(f"malformed model description: {where}: {len(classes)} classes for an assembly of "
                            f"{len(spec.label_map)} outputs")
        return cls(
            arch=_opt_str(_get(d, "arch", where), f"{where}.arch"),
            arch_kwargs=_arch_kwargs(_get(d, "arch_kwargs", where), f"{where}.arch_kwargs"),
            class_names=tuple(_str(n, f"{where}.class_names[{i}]") for i, n in enumerate(names)),
            classes=tuple(classes),
            input=None if d.get("input") is None else InputSpec.from_json(d["input"], f"{where}.input"),
            dataset=_opt_str(d.get("dataset"), f"{where}.dataset"),
            kind=kind,
            pruning=_plan(d.get("pruning"), f"{where}.pruning"),
            provenance=provenance,
            assembly=spec,
        )


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
            f"attach a description with modellego.io.info.set_info(model, ModelInfo(...))"
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
