"""Write what a user asks `modellego routes` for: the JSON report and the figures, or one input explained."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...io.atomic import write_json
from . import plots
from .analysis import RouteAnalysis
from .samples import SampleRoutes


def write_route_report(analysis: RouteAnalysis, folder: str | os.PathLike, *, classes: Sequence[int] | None = None,
                       formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``routes.json``, the route diagram of `classes`, the similarity heat map and the overlap curve.

    Returns the paths written, the JSON report first.
    """
    folder = Path(folder)
    written = [folder / "routes.json"]
    write_json(written[0], analysis.to_json())
    figures = {"routes": plots.route_diagram(analysis, classes), "similarity": plots.similarity_heatmap(analysis),
               "overlap": plots.overlap_curve(analysis)}
    for name, fig in figures.items():
        written += [plots.save_figure(fig, folder / f"{name}.{fmt}") for fmt in formats]
    return written


def describe_sample(routes: SampleRoutes, index: int, analysis: RouteAnalysis, true_class: int | None) -> list[str]:
    """Lines that explain one input's route: prediction, route score, per-layer agreement, where it leaves."""
    name = dict(zip(analysis.classes, analysis.class_names))
    pred = int(routes.predicted[index])
    one = torch.tensor([pred])
    sliced = routes.pick(index)
    lines = [f"predicted {name.get(pred, pred)}" + (f", true {name.get(true_class, true_class)}" if true_class is not None else "")
             + f"; route score {float(sliced.score(analysis)[0]):.3f} (Jaccard with the predicted class's route)"]
    vs_pred = sliced.agreement(analysis, one)[0]
    vs_true = sliced.agreement(analysis, torch.tensor([true_class]))[0] if true_class not in (None, pred) else None
    for i, layer in enumerate(routes.layers):
        extra = f"  vs true {float(vs_true[i]):.2f}" if vs_true is not None else ""
        lines.append(f"  {layer:<28} vs predicted {float(vs_pred[i]):.2f}{extra}")
    if vs_true is not None:
        hidden = [i for i, ly in enumerate(routes.layers) if ly != routes.output_layer]
        closer = [routes.layers[i] for i in hidden if vs_pred[i] > vs_true[i]]
        lines.append(f"  closer to the predicted class's route than the true class's at: {', '.join(closer) or 'no layer'}")
    return lines
