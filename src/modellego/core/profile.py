"""The `Profile` file: each class's route (relevant inputs/outputs per layer), stored without pickle.

A profile is safetensors masks plus a JSON header; `core.profiling.profile` computes one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import CorruptFileError, UserError
from ..io.atomic import atomic_path
from .locate import Thresholds


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
        header = {
            "format": "modellego-profile", "format_version": 1, "library_version": __version__,
            "classes": list(self.classes), "class_names": list(self.class_names),
            "layers": self.layers, "thresholds": self.thresholds.to_json(), "provenance": self.provenance,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"modellego-profile": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        path = Path(path)
        if not path.exists():
            raise UserError(f"no profile at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("modellego-profile")
                if meta is None:
                    raise CorruptFileError(f"{path} is not a modellego profile")
                header = json.loads(meta)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise CorruptFileError(f"{path} is not a readable profile ({e})") from e
        try:
            n = len(header["classes"])
            in_masks = {k: tensors[f"in/{k}"].bool() for k in header["layers"]}
            out_masks = {k: tensors[f"out/{k}"].bool() for k in header["layers"]}
            if any(v.ndim != 2 or v.shape[0] != n for v in [*in_masks.values(), *out_masks.values()]):
                raise ValueError("mask shapes do not match the class count")
            contributions = None
            if any(k.startswith("r/") for k in tensors):
                contributions = {k: tensors[f"r/{k}"] for k in header["layers"]}
                for k, r in contributions.items():
                    want = (n, out_masks[k].shape[1])
                    if (r.ndim != 3 or tuple(r.shape[:2]) != want or not r.is_floating_point()
                            or in_masks[k].shape[1] % max(r.shape[2], 1)):
                        raise ValueError(f"contributions of {k} have shape {tuple(r.shape)}, expected {want} + (P,)")
            return cls(tuple(header["classes"]), tuple(header["class_names"]), in_masks, out_masks,
                       Thresholds(**header["thresholds"]), header.get("provenance", {}), contributions)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: malformed profile ({e})") from e
