"""Detector metrics and the training-free logit baselines that detector scores are compared with.

Convention: a score is high on what looks normal (in-distribution, correctly classified, clean)
and low on what should be flagged. `auroc` and `fpr_at_tpr` take the normal and the flagged
scores apart, so no label vector can be flipped by mistake.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError


def _check(normal: torch.Tensor, flagged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    normal, flagged = torch.as_tensor(normal).double().flatten(), torch.as_tensor(flagged).double().flatten()
    if not len(normal) or not len(flagged):
        raise UserError(f"a detector needs scores of both kinds: {len(normal)} normal, {len(flagged)} to flag")
    if bool(torch.isnan(normal).any() | torch.isnan(flagged).any()):
        raise UserError("detector scores contain NaN")
    return normal, flagged


def auroc(normal: torch.Tensor, flagged: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a normal input scores above a flagged one (ties count half)."""
    normal, flagged = _check(normal, flagged)
    both = torch.cat([normal, flagged])
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    # Mid-ranks (1-based) so that ties count half: the Mann-Whitney U statistic.
    upper = torch.cumsum(counts, 0).double()
    mid = upper - (counts.double() - 1) / 2
    ranks = mid[inverse]
    u = ranks[: len(normal)].sum() - len(normal) * (len(normal) + 1) / 2
    return float(u / (len(normal) * len(flagged)))


def fpr_at_tpr(normal: torch.Tensor, flagged: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of flagged inputs still accepted at the highest threshold that accepts `tpr` of the normal ones."""
    normal, flagged = _check(normal, flagged)
    if not 0 < tpr <= 1:
        raise UserError(f"tpr must be in (0, 1], got {tpr}")
    ranked = torch.sort(normal, descending=True).values
    threshold = ranked[max(0, int(torch.ceil(torch.tensor(tpr * len(normal)))) - 1)]  # accepts >= threshold
    return float((flagged >= threshold).double().mean())


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks and Gimpel, 2017). Shape: (B, C) -> (B,)."""
    return logits.float().softmax(1).amax(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy T·logsumexp(logits / T) (Liu et al., 2020). Shape: (B, C) -> (B,)."""
    return temperature * torch.logsumexp(logits.float() / temperature, 1)


def standardised_sum(reference: Sequence[torch.Tensor], scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i (scores_i - mean(reference_i)) / std(reference_i): scores on different scales added fairly.

    The reference scores come from normal inputs the detector may see in advance (training images).
    """
    if len(reference) != len(scores):
        raise UserError("one reference per score")
    total = torch.zeros_like(torch.as_tensor(scores[0], dtype=torch.float64))
    for ref, s in zip(reference, scores):
        ref = torch.as_tensor(ref, dtype=torch.float64)
        total = total + (torch.as_tensor(s, dtype=torch.float64) - ref.mean()) / ref.std().clamp(min=1e-12)
    return total
