"""Making an assembly's outputs comparable: the paper's parameter scaling and a calibrated head.

Components that never met in training speak on different scales, and each one is confident on
images it has never seen. Two training-free fixes, both fitted on TRAINING images only and both
stored in the assembly's `OutputHead` (nothing else changes):

- ``paper`` (Eqs. 12-14, last layer): e_j = mean logit of output j over training images of class
  j; output j is scaled by ē / e_j. A class without a positive e_j (no image, or a non-positive
  mean logit) keeps scale 1 and is reported, never a division by zero.
- ``calibrated``: a per-output scale and bias plus, per component, a weight on that component's
  log-sum-exp of its own logits (its "this image is mine" confidence), fitted by minimising the
  cross-entropy of the assembled outputs on a few training images per class. Only
  2·T + (number of components) numbers are fitted; the network's weights never change.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .assemble import Assembly
from .errors import UserError
from .info import get_info, set_info

log = logging.getLogger(__name__)
SCALINGS = ("none", "paper", "calibrated")


@torch.no_grad()
def assembled_logits(assembly: Assembly, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits before the head, and labels (assembled output indices). Shape: (N, T), (N,)."""
    device = next(assembly.parameters()).device
    was_training = assembly.training
    assembly.eval()
    zs, ys = [], []
    try:
        for x, y in batches:
            zs.append(assembly.logits(x.to(device)).double().cpu())
            ys.append(y.cpu())
    finally:
        assembly.train(was_training)
    if not zs:
        raise UserError("no calibration images")
    return torch.cat(zs), torch.cat(ys)


def paper_scale(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Eqs. 12-14: per-output scale ē / e_j; also the outputs left unscaled."""
    t = z.shape[1]
    e = torch.full((t,), float("nan"), dtype=z.dtype)
    for j in range(t):
        hit = y == j
        if hit.any():
            e[j] = z[hit, j].mean()
    ok = torch.isfinite(e) & (e > 0)
    skipped = [j for j in range(t) if not ok[j]]
    scale = torch.ones(t, dtype=z.dtype)
    if ok.any():
        scale[ok] = e[ok].mean() / e[ok]
    return scale, skipped


def fit_head(z: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, *, l2: float = 1e-3, steps: int = 200
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, bias and per-group energy weight minimising cross-entropy (+ a small L2 penalty).

    The fit runs on logits divided by their spread, and the penalty pulls towards the identity
    there: towards the raw logits up to one positive factor, which leaves every argmax unchanged.
    """
    t, g = z.shape[1], int(groups.max()) + 1
    std = z.std().clamp(min=1e-6)
    zn = z / std  # fit on a unit scale, undo below
    lse = torch.stack([zn[:, groups == k].logsumexp(1) for k in range(g)], 1)  # (N, G)
    scale = torch.ones(t, dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(t, dtype=z.dtype, requires_grad=True)
    energy = torch.zeros(g, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([scale, bias, energy], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = zn * scale + bias + (lse * energy)[:, groups]
        loss = F.cross_entropy(out, y) + l2 * ((scale - 1).square().sum() + bias.square().sum() + energy.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # out = (z/std)·s + b + e·lse(z/std): express on raw z (lse of z/std is what the head must see).
    return (scale / std).detach(), bias.detach(), energy.detach()


def scale_assembly(assembly: Assembly, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], method: str = "calibrated"
                   ) -> dict[str, object]:
    """Set the assembly's head from training images (labels: assembled output indices), in place.

    Returns what was done (method, images, skipped outputs, fitted values).
    """
    if method not in SCALINGS:
        raise UserError(f"scaling must be one of {SCALINGS}, got {method!r}")
    head = assembly.head
    report: dict[str, object] = {"method": method}
    with torch.no_grad():
        head.scale.fill_(1)
        head.bias.zero_()
        head.energy.zero_()
        head.temperature.fill_(1)
    if method != "none":
        z, y = assembled_logits(assembly, batches)
        report["images"] = int(len(y))
        missing = sorted(set(range(z.shape[1])) - set(y.tolist()))
        if missing:
            names = get_info(assembly).class_names if get_info(assembly) else None
            log.warning("no calibration image for outputs %s", [names[j] for j in missing] if names else missing)
            report["no_images"] = missing
        with torch.no_grad():
            if method == "paper":
                scale, skipped = paper_scale(z, y)
                head.scale.copy_(scale.to(head.scale.dtype))
                report["unscaled"] = skipped
                if skipped:
                    log.warning("paper scaling left outputs %s unscaled (no image or a non-positive mean logit)", skipped)
            else:
                scale, bias, energy = fit_head(z, y, head.groups.cpu())
                std = z.std().clamp(min=1e-6)
                head.scale.copy_(scale.to(head.scale.dtype))
                head.bias.copy_(bias.to(head.bias.dtype))
                head.energy.copy_(energy.to(head.energy.dtype))
                head.temperature.fill_(float(std))
        report["scale"] = [round(float(v), 5) for v in head.scale]
    info = get_info(assembly)
    if info is not None:
        set_info(assembly, info.replace(provenance={**info.provenance, "scaling": report}))
    return report
