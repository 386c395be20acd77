"""Pictures of decision routes (matplotlib's object API: headless, no global state, figures returned).

- `route_diagram`: layers as columns, channels as nodes, one colour per class, shared channels marked;
- `similarity_heatmap`: class × class Jaccard of the routes, classes ordered so similar ones sit together;
- `overlap_curve`: per layer, how much the routes of the classes overlap;
- `sample_figure`: one input's route against the routes of its true and predicted classes.

`save_figure` writes any of them atomically as PNG, SVG or PDF (by the file's suffix).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from ...errors import UserError
from ..figures import FORMATS, save_figure  # noqa: F401  # re-exported: routes figures are saved from here
from .analysis import RouteAnalysis
from .samples import SampleRoutes

SHARED, PARTLY, UNUSED = "#222222", "#8c8c8c", "#e6e6e6"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#bcbd22")


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _categories(masks: torch.Tensor) -> np.ndarray:
    """Per channel: -1 shared by all rows, -2 by some, -3 by none, else the one row that uses it. Shape (K, Q) -> (Q,)."""
    m = masks.numpy()
    users = m.sum(0)
    cat = np.where(users == 0, -3, np.where(users == len(m), -1, -2))
    only = users == 1
    cat[only] = m[:, only].argmax(0)
    return cat


def _order(cat: np.ndarray) -> np.ndarray:
    """Channels sorted shared first, then each class's own, then partly shared, then unused (stable)."""
    rank = np.where(cat == -1, -10, np.where(cat == -2, 1000, np.where(cat == -3, 2000, cat)))
    return np.argsort(rank, kind="stable")


def route_diagram(analysis: RouteAnalysis, classes: Sequence[int] | None = None, *, max_nodes: int = 48) -> Figure:
    """Layers as columns, channels as nodes coloured by which of `classes` keeps them.

    Channels are sorted within a column (shared, then each class's own, then partly shared,
    then unused); a column wider than `max_nodes` shows one node per bin of channels, coloured by
    the bin's most common kind, so VGG-16's 512-channel layers stay readable.

    Args:
        analysis: the routes.
        classes: up to eight classes to draw (default: the first two analysed).
        max_nodes: the most nodes in one column.
    """
    classes = list(classes) if classes is not None else list(analysis.classes[:2])
    if not 1 <= len(classes) <= len(PALETTE):
        raise UserError(f"a route diagram draws 1 to {len(PALETTE)} classes, got {len(classes)}")
    rows = [analysis.row(c) for c in classes]
    fig = Figure(figsize=(max(6.0, 0.9 * len(analysis.layers) + 2), 6.5))
    ax = fig.add_subplot()
    colours = {-1: SHARED, -2: PARTLY, -3: UNUSED, **{i: PALETTE[i] for i in range(len(rows))}}
    for x, layer in enumerate(analysis.layers):
        cat = _categories(analysis.routes[layer][rows])
        cat = cat[_order(cat)]
        per_node = math.ceil(len(cat) / max_nodes)
        # One node per `per_node` channels of ONE kind: a class's few own channels never vanish into a bin.
        kinds = [int(k) for k in dict.fromkeys(cat.tolist()) for _ in range(math.ceil(int((cat == k).sum()) / per_node))]
        ys = np.linspace(1, 0, len(kinds)) if len(kinds) > 1 else np.array([0.5])
        ax.scatter(np.full(len(kinds), x), ys, s=max(8.0, 260.0 / max(len(kinds), 1) ** 0.8),
                   c=[to_rgba(colours[k]) for k in kinds], edgecolors="#555555", linewidths=0.3, zorder=2)
        shared = int((cat == -1).sum())
        label = f"{shared}/{len(cat)}" + (f"\n×{per_node}" if per_node > 1 else "")
        ax.text(x, -0.06, label, ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(analysis.layers)), [_short(ly) for ly in analysis.layers], rotation=60, ha="right", fontsize=7)
    ax.set_yticks([])
    ax.set_ylim(-0.16, 1.05)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    names = [analysis.class_names[r] for r in rows]
    handles = [ax.scatter([], [], c=PALETTE[i], label=f"only {n}") for i, n in enumerate(names)]
    handles.append(ax.scatter([], [], c=SHARED, label="shared by all" if len(rows) > 2 else "shared"))
    if len(rows) > 2:
        handles.append(ax.scatter([], [], c=PARTLY, label="shared by some"))
    handles.append(ax.scatter([], [], c=UNUSED, edgecolors="#555555", linewidths=0.3, label="unused"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 5), fontsize=8,
              frameon=False)
    fig.suptitle(f"Decision routes of {', '.join(names)}\nunder each layer: channels shared / width; ×n: channels per node",
                 fontsize=9)
    return fig


def seriation(similarity: np.ndarray) -> np.ndarray:
    """An order that puts similar items next to each other: the Fiedler vector of the similarity graph."""
    k = len(similarity)
    if k < 3:
        return np.arange(k)
    w = np.clip(similarity, 0, None).astype(np.float64)
    np.fill_diagonal(w, 0)
    d = w.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    lap = np.eye(k) - inv[:, None] * w * inv[None, :]  # normalised Laplacian
    _, vecs = np.linalg.eigh(lap)
    return np.argsort(vecs[:, 1] * inv, kind="stable")


def similarity_heatmap(analysis: RouteAnalysis, layer: str | None = None, *, cluster: bool = True) -> Figure:
    """Class × class Jaccard of the routes of one layer, or of every layer together (``None``)."""
    j = analysis.jaccard(layer).numpy()
    order = seriation(j) if cluster else np.arange(len(j))
    j = j[np.ix_(order, order)]
    names = [analysis.class_names[i] for i in order]
    size = min(12.0, 3.0 + 0.35 * len(names))
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    im = ax.imshow(j, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 12:
        for a in range(len(names)):
            for b in range(len(names)):
                ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if j[a, b] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard of routes")
    where = f"layer {layer}" if layer else "all layers"
    ax.set_title(f"Route similarity, {where}" + (" (similar classes adjacent)" if cluster else ""), fontsize=10)
    return fig


def overlap_curve(analysis: RouteAnalysis) -> Figure:
    """Per layer: mean Jaccard of the class pairs' routes (band: min to max) and the share of channels used by all."""
    curve = analysis.overlap_curve()
    x = np.arange(len(analysis.layers))
    counts = [analysis.counts(ly) for ly in analysis.layers]
    used_by_all = [c["shared_by_all"] / max(1, c["used_by_any"]) for c in counts]
    fig = Figure(figsize=(max(6.0, 0.5 * len(x) + 2), 4.0))
    ax = fig.add_subplot()
    ax.fill_between(x, curve["min"], curve["max"], alpha=0.2, color=PALETTE[0], label="min to max over class pairs")
    ax.plot(x, curve["mean"], marker="o", color=PALETTE[0], label="mean Jaccard of two classes' routes")
    ax.plot(x, used_by_all, marker="s", ls="--", color=PALETTE[1], label="channels used by every class / by any")
    ax.set_xticks(x, [_short(ly) for ly in analysis.layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("overlap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Where the routes of {len(analysis.classes)} classes part", fontsize=10)
    return fig


def sample_figure(routes: SampleRoutes, index: int, analysis: RouteAnalysis, *, true_class: int | None = None,
                  image: torch.Tensor | None = None) -> Figure:
    """One input's route, layer by layer, against the routes of its true and predicted classes.

    Args:
        routes: the inputs' routes (`sample_routes`).
        index: which input.
        analysis: the class routes from the model's profile.
        true_class: the input's label, when known.
        image: the input itself, Shape (C, H, W), drawn beside the curves.
    """
    one = routes.pick(index)
    pred = int(one.predicted[0])
    fig = Figure(figsize=(10.0 if image is not None else 8.0, 4.0))
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 3], wspace=0.3) if image is not None else fig.add_gridspec(1, 1)
    if image is not None:
        iax = fig.add_subplot(grid[0, 0])
        t = image.detach().float().cpu()
        img = ((t - t.min()) / (t.max() - t.min() + 1e-12)).numpy()  # (C, H, W) in [0, 1]
        iax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None)
        iax.set_axis_off()
    ax = fig.add_subplot(grid[0, 1] if image is not None else grid[0, 0])
    x = np.arange(len(routes.layers))
    name = dict(zip(analysis.classes, analysis.class_names))
    score = float(one.score(analysis)[0])
    ax.plot(x, one.agreement(analysis, torch.tensor([pred]))[0].numpy(), marker="o", color=PALETTE[1],
            label=f"vs predicted {name.get(pred, pred)}")
    if true_class is not None and true_class != pred:
        ax.plot(x, one.agreement(analysis, torch.tensor([true_class]))[0].numpy(), marker="s", color=PALETTE[2],
                label=f"vs true {name.get(true_class, true_class)}")
    ax.set_xticks(x, [_short(ly) for ly in routes.layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Jaccard with the class's route")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    truth = f"true {name.get(true_class, true_class)}, " if true_class is not None else ""
    ax.set_title(f"This input's route ({truth}predicted {name.get(pred, pred)}; route score {score:.2f})", fontsize=10)
    return fig
