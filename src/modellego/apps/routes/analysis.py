"""Routes of a profile compared class by class: shared and exclusive channels, Jaccard, where routes part.

A class's *decision route* (the paper's §5.1) is the set of channels every layer emits that matter
to that class: the profile's out-masks. Layers are taken in the profile's order, which is the
order of the forward pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...core.profile import Profile
from ...errors import UserError

PART_BELOW = 0.5  # routes have parted at a layer once their Jaccard stays below this


def jaccard_matrix(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard of the rows of `masks`; two empty rows count as equal (1).

    Shape: (K, Q) bool -> (K, K) float64.
    """
    m = masks.to(torch.float64)
    inter = m @ m.T  # (K, K)
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@dataclass(frozen=True)
class RouteAnalysis:
    """The routes of some profiled classes, keyed by layer name.

    Attributes:
        layers: layer names in forward order.
        classes: output indices, in the order of the mask rows.
        class_names: their names.
        routes: per layer, each class's kept output channels, Shape (K, Q) bool.
    """

    layers: tuple[str, ...]
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    routes: dict[str, torch.Tensor]

    @classmethod
    def from_profile(cls, profile: Profile, classes: Sequence[int] | None = None) -> RouteAnalysis:
        """The routes of `classes` (default: every profiled class that has samples)."""
        missing = set(profile.provenance.get("missing", []))
        chosen = [c for c in profile.classes if c not in missing] if classes is None else [int(c) for c in classes]
        if not chosen:
            raise UserError("no class with a route to analyse")
        rows = profile.rows(chosen)
        names = tuple(profile.class_names[r] for r in rows)
        return cls(tuple(profile.layers), tuple(chosen), names, {k: v[rows] for k, v in profile.out_masks.items()})

    def row(self, cls: int) -> int:
        if cls not in self.classes:
            raise UserError(f"class {cls} is not among the analysed classes {list(self.classes)}")
        return self.classes.index(cls)

    def kept(self, layer: str) -> list[list[int]]:
        """Each class's kept channels of `layer`."""
        return [torch.nonzero(m).flatten().tolist() for m in self._layer(layer)]

    def counts(self, layer: str) -> dict[str, Any]:
        """Channels of `layer`: width, per class kept and exclusive, shared by all, used by any."""
        m = self._layer(layer)
        users = m.sum(0)  # (Q,) classes that use each channel
        return {"width": m.shape[1], "kept": m.sum(1).tolist(), "exclusive": (m & (users == 1)).sum(1).tolist(),
                "shared_by_all": int((users == len(self.classes)).sum()), "used_by_any": int((users > 0).sum())}

    def jaccard(self, layer: str | None = None) -> torch.Tensor:
        """Class × class Jaccard of one layer's routes, or over every layer's channels (``None``). Shape (K, K)."""
        if layer is not None:
            return jaccard_matrix(self._layer(layer))
        return jaccard_matrix(torch.cat([self.routes[k] for k in self.layers], 1))

    def parting_layer(self, a: int, b: int, below: float = PART_BELOW) -> str | None:
        """The first layer from which on the routes of classes `a` and `b` keep a Jaccard below `below`."""
        index = int(self._parting_index(below)[self.row(a), self.row(b)])
        return self.layers[index] if index < len(self.layers) else None

    def _parting_index(self, below: float) -> torch.Tensor:
        """Per class pair, the index of its parting layer (``len(layers)`` where routes never part). Shape (K, K)."""
        apart = torch.stack([self.jaccard(ly) < below for ly in self.layers])  # (L, K, K)
        # Layers from the last backwards while still apart: a reversed cumulative AND.
        trailing = apart.flip(0).to(torch.int64).cumprod(0).sum(0)  # (K, K)
        return len(self.layers) - trailing

    def overlap_curve(self) -> dict[str, list[float]]:
        """Per layer: mean, min and max Jaccard over class pairs (all 1 with one class)."""
        out: dict[str, list[float]] = {"mean": [], "min": [], "max": []}
        k = len(self.classes)
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool), 1)
        for layer in self.layers:
            j = self.jaccard(layer)[upper] if k > 1 else torch.ones(1, dtype=torch.float64)
            out["mean"].append(float(j.mean()))
            out["min"].append(float(j.min()))
            out["max"].append(float(j.max()))
        return out

    def to_json(self) -> dict[str, Any]:
        """A report for scripts: per-layer counts and Jaccard matrices, overall Jaccard, parting layers."""
        k, parts = len(self.classes), self._parting_index(PART_BELOW)
        return {
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "part_below": PART_BELOW,
            "layers": [{"name": ly, **self.counts(ly), "channels": self.kept(ly),
                        "jaccard": _rounded(self.jaccard(ly))} for ly in self.layers],
            "jaccard": _rounded(self.jaccard()),
            "parting_layer": {f"{self.classes[i]}-{self.classes[j]}": self.layers[int(parts[i, j])]
                              if parts[i, j] < len(self.layers) else None for i in range(k) for j in range(i + 1, k)},
        }

    def _layer(self, layer: str) -> torch.Tensor:
        if layer not in self.routes:
            raise UserError(f"no layer {layer!r} in the routes (layers: {', '.join(self.layers)})")
        return self.routes[layer]


def _rounded(m: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in m]
