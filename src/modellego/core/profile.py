"""The `Profile` file: each class's route (relevant inputs/outputs per layer), stored without pickle.

A profile is safetensors masks plus a JSON header; `core.profiling.profile` computes one. It is
read through the one checked path of every file of this library (`modellego.io.checkpoint`): the
header is bounded and hashed, its fields and the masks' names, dtypes and shapes are checked before
their data is read, and the masks must hold only 0 and 1.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..errors import UserError, unknown_name
from ..io.atomic import atomic_path
from ..io.checkpoint import StoredTensor, hashed_header, open_checked
from ..io.info import MAX_CHANNELS, MAX_IMAGE_SIDE, MAX_INDEX, weights_hash
from .graph import ChannelGraph
from .locate import Thresholds

FORMAT = "modellego-profile"
# 2: `header_sha256` covers the header and `tensors_sha256` the masks (1 still loads, unchecked).
FORMAT_VERSION = 2
HASHED_SINCE = 2
_THRESHOLDS = ("conv_alpha", "conv_beta", "linear_alpha", "linear_beta")
_MASK_DTYPES = ("U8", "BOOL")


@dataclass(frozen=True)
class Profile:
    """Per-class route map of a model: relevant inputs/outputs of every Conv2d and Linear layer.

    Attributes:
        classes: profiled output indices.
        class_names: their names.
        in_masks: per layer, Shape (len(classes), P) bool.
        out_masks: per layer, Shape (len(classes), Q) bool.
        thresholds: α and β used.
        provenance: model hash, input shape, mode, samples per class, timings.
        contributions: per layer, the relative contributions r (Eq. 5) the masks came from,
            Shape (len(classes), Q, P // groups); kept only on request (``keep_contributions``),
            so that channels can be located again, e.g. under a FLOPs budget, without profiling.
    """

    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    in_masks: dict[str, torch.Tensor]
    out_masks: dict[str, torch.Tensor]
    thresholds: Thresholds
    provenance: dict[str, Any] = field(default_factory=dict)
    contributions: dict[str, torch.Tensor] | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.in_masks)

    @property
    def model_sha256(self) -> str | None:
        return self.provenance.get("model_sha256")

    def rows(self, classes: Sequence[int]) -> list[int]:
        """Row of each class in the masks; a clear error for classes not profiled or without samples."""
        pos = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in classes if c not in pos]
        if unknown:
            raise UserError(f"classes {unknown} were not profiled (profiled: {list(self.classes)})")
        empty = [c for c in classes if c in set(self.provenance.get("missing", []))]
        if empty:
            names = ", ".join(repr(self.class_names[pos[c]]) for c in empty)
            raise UserError(f"class {names} had no correctly classified training sample, so it has no route; "
                            "profile with more data or a better model")
        return [pos[c] for c in classes]

    def task_in_masks(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """Union over `classes` of the relevant inputs of every layer."""
        rows = self.rows(classes)
        return {k: v[rows].any(0) for k, v in self.in_masks.items()}

    def task_out_masks(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.rows(classes)
        return {k: v[rows].any(0) for k, v in self.out_masks.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile (safetensors masks + JSON header) atomically."""
        path = Path(path)
        tensors = {f"in/{k}": v.to(torch.uint8).contiguous() for k, v in self.in_masks.items()}
        tensors |= {f"out/{k}": v.to(torch.uint8).contiguous() for k, v in self.out_masks.items()}
        tensors |= {f"r/{k}": v.contiguous() for k, v in (self.contributions or {}).items()}
        header = hashed_header({
            "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            "classes": list(self.classes), "class_names": list(self.class_names),
            "layers": self.layers, "thresholds": self.thresholds.to_json(), "provenance": self.provenance,
            "tensors_sha256": weights_hash(tensors),
        })
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read a profile written by `save`, every field and tensor checked (see `modellego.io.checkpoint`).

        The masks' shapes are checked against each other and the class count; against a model, see
        `check_graph`.

        Raises:
            UserError: no file at `path`.
            CorruptFileError: the file is truncated, corrupt, edited or not a modellego profile.
        """
        with open_checked(path, key=FORMAT, fmt=FORMAT, version=FORMAT_VERSION, hashed_since=HASHED_SINCE,
                          what="profile", missing="no profile at") as f:
            try:
                fields = _fields(f.header)
                _check_table(f.table, fields)
            except (UserError, TypeError, ValueError) as e:
                raise f.corrupt(f"malformed profile: {e}") from e
            tensors = f.read_tensors(f.header.get("tensors_sha256") if f.version >= HASHED_SINCE else None)
        layers = fields["layers"]
        for name, t in tensors.items():
            if not name.startswith("r/") and bool((t.to(torch.uint8) > 1).any()):
                raise f.corrupt(f"malformed profile: mask {name!r} holds values other than 0 and 1")
        contributions = {k: tensors[f"r/{k}"] for k in layers} if f"r/{layers[0]}" in tensors else None
        return cls(tuple(fields["classes"]), tuple(fields["class_names"]),
                   {k: tensors[f"in/{k}"].bool() for k in layers}, {k: tensors[f"out/{k}"].bool() for k in layers},
                   fields["thresholds"], fields["provenance"], contributions)

    def check_graph(self, graph: ChannelGraph) -> None:
        """Check that the masks fit a traced model: every profiled layer exists, with these widths.

        Raises:
            UserError: a layer the model does not have, or masks of other widths (a profile of
                another model); the message names the layer and both widths.
        """
        for name in self.layers:
            layer = graph.layers.get(name)
            if layer is None:
                raise unknown_name("profiled layer", name, graph.layers)
            m = layer.module
            p, q = (m.in_channels, m.out_channels) if isinstance(m, torch.nn.Conv2d) else (m.in_features, m.out_features)
            got = (self.in_masks[name].shape[-1], self.out_masks[name].shape[-1])
            if got != (p, q):
                raise UserError(f"the profile's masks of layer {name!r} have (inputs, outputs) {got}, the model's layer "
                                f"{(p, q)}: the profile is of another model")


def _fields(h: dict[str, Any]) -> dict[str, Any]:
    """The checked header of a profile: classes, names, layers, thresholds, provenance."""
    classes = _ints(h.get("classes"), "classes", nonempty=True)
    if len(set(classes)) != len(classes):
        raise UserError("classes repeat")
    names = h.get("class_names")
    if not isinstance(names, list) or len(names) != len(classes) or not all(isinstance(n, str) for n in names):
        raise UserError(f"class_names is not a list of {len(classes)} strings")
    layers = h.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise UserError("layers is not a non-empty list of layer names")
    if len(set(layers)) != len(layers):
        raise UserError("layers repeat")
    th = h.get("thresholds")
    if not isinstance(th, dict) or sorted(th) != sorted(_THRESHOLDS):
        raise UserError(f"thresholds is not an object of {', '.join(_THRESHOLDS)}")
    for k, v in th.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise UserError(f"threshold {k} is not a number")
    prov = h.get("provenance", {})
    if not isinstance(prov, dict):
        raise UserError("provenance is not an object")
    shape = _ints(prov.get("input_shape"), "provenance.input_shape", lo=1, size=3)
    if shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_IMAGE_SIDE:
        raise UserError(f"provenance.input_shape {shape} is beyond [{MAX_CHANNELS}, {MAX_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]")
    if "missing" in prov:
        _ints(prov["missing"], "provenance.missing")
    sha = prov.get("model_sha256")
    if sha is not None and not isinstance(sha, str):
        raise UserError("provenance.model_sha256 is not a string")
    if h.get("format_version", 1) >= HASHED_SINCE and not isinstance(h.get("tensors_sha256"), str):
        raise UserError("tensors_sha256 is missing")
    return {"classes": classes, "class_names": names, "layers": layers,
            "thresholds": Thresholds(**{k: float(v) for k, v in th.items()}), "provenance": prov}


def _ints(v: Any, what: str, *, lo: int = 0, size: int | None = None, nonempty: bool = False) -> list[int]:
    if (not isinstance(v, list) or (size is not None and len(v) != size) or (nonempty and not v)
            or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= MAX_INDEX for x in v)):
        want = f"{size} " if size is not None else "non-empty " if nonempty else ""
        raise UserError(f"{what} is not a list of {want}integers >= {lo}")
    return v


def _check_table(table: dict[str, StoredTensor], fields: dict[str, Any]) -> None:
    """The tensors a profile of these layers and classes holds, before their data is read."""
    layers, n = fields["layers"], len(fields["classes"])
    want = {f"{d}/{k}" for d in ("in", "out") for k in layers}
    with_r = want | {f"r/{k}" for k in layers}
    if set(table) not in (want, with_r):
        odd = sorted(set(table) ^ with_r)
        raise UserError(f"the tensors are not the masks of its layers (e.g. {odd[:3]})")
    for k in layers:
        ins, outs = table[f"in/{k}"], table[f"out/{k}"]
        for name, t in ((f"in/{k}", ins), (f"out/{k}", outs)):
            if t.dtype not in _MASK_DTYPES or len(t.shape) != 2 or t.shape[0] != n or t.shape[1] < 1:
                raise UserError(f"mask {name!r} is {t.dtype} {list(t.shape)}, expected U8 of shape [{n}, width]")
        r = table.get(f"r/{k}")
        if r is not None:
            p, q = ins.shape[1], outs.shape[1]
            if (r.kind != "float" or len(r.shape) != 3 or r.shape[:2] != (n, q) or r.shape[2] < 1 or p % r.shape[2]):
                raise UserError(f"contributions of {k} have shape {list(r.shape)}, expected [{n}, {q}, P] with P "
                                f"dividing {p}")
