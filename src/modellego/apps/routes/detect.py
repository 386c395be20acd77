"""Routes as a detector: how well an input's route matches its predicted class's, beside the baselines.

`route_score` is `SampleRoutes.score`: the Jaccard, over every hidden layer's channels, of the
input's own route and the route of the class the model predicts. It needs no training and no
optimisation per input (CDRP, Wang et al. 2018, fits gates per image). The baselines it is
measured against are the usual training-free ones: maximum softmax probability and energy
(`modellego.evaluation.detection`) and `Mahalanobis` below, the closed-form Gaussian detector
the density head also uses.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ...assembly.density import fit_gaussian, pooled
from ...errors import UserError
from ...hooks import forward_hooks


class Mahalanobis:
    """Class-conditional Gaussians with a shared covariance on one layer's input features (Lee et al., 2018).

    The score is the largest class log-density, -½ min_c ‖(h - μ_c) L‖², with h the pooled input of
    `layer` (the penultimate features for the classifier layer). Fitted in closed form.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model, self.layer = model, layer
        self.means: torch.Tensor | None = None
        self.whiten: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features of `layer`'s input) for a batch."""
        seen: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen["h"] = pooled(args[0]).double()

        with forward_hooks(self.model, {self.layer: hook}, pre=True), torch.no_grad():
            logits = self.model(x)
        return logits, seen["h"]

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Mahalanobis:
        device = next(self.model.parameters()).device
        hs, ys = [], []
        for x, y in batches:
            hs.append(self.features(x.to(device))[1].cpu())
            ys.append(y.cpu())
        self.means, self.whiten = fit_gaussian(torch.cat(hs), torch.cat(ys))
        return self

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Shape: (B, F) pooled features -> (B,)."""
        if self.means is None or self.whiten is None:
            raise UserError("fit the Mahalanobis detector before scoring")
        d2 = ((h.cpu() @ self.whiten)[:, None, :] - (self.means @ self.whiten)[None]).square().sum(-1)  # (B, C)
        return -0.5 * d2.amin(1)
