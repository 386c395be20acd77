"""Decision routes: each class's relevant channels per layer, analysed, drawn and used as a detector.

- `analysis`: routes of a `Profile` compared per layer (shared, exclusive, Jaccard, where they part);
- `samples`: the route of each input located from its own contributions, scored against its class's;
- `plots`: route diagram, class similarity heat map, per-layer overlap curve, one sample's route;
- `detect`: route-match scores beside the training-free baselines, with AUROC and FPR at 95% TPR.
"""
from __future__ import annotations

from .analysis import RouteAnalysis
from .samples import SampleRoutes, sample_routes

__all__ = ["RouteAnalysis", "SampleRoutes", "sample_routes"]
