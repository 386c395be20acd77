"""Making an assembly's outputs comparable: the paper's parameter scaling and a calibrated head.

Components that never met in training speak on different scales, and each one is confident on
images it has never seen. Three training-free fixes, all fitted on TRAINING images only and
stored in the assembly's `OutputHead` (and `DensityProbe`); no network weight changes:

- ``paper`` (Eqs. 12-14, last layer): e_j = mean logit of output j over training images of class
  j; output j is scaled by ē / e_j. A class without a positive e_j (no image, or a non-positive
  mean logit) keeps scale 1 and is reported, never a division by zero.
- ``calibrated``: a per-output scale and bias plus, per component, a weight on that component's
  log-sum-exp of its own logits (its "this image is mine" confidence), fitted by minimising the
  cross-entropy of the assembled outputs on a few training images per class. Only
  2·T + (number of components) numbers are fitted; the network's weights never change.
- ``density``: ``calibrated`` plus, per component, Gaussian densities of its own features at
  every layer (`modellego.assembly.density`), a stronger "not mine" signal; one more weight per layer and
  component is fitted with the head.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.distributed import agree_shards, gather_rows
from ..errors import UserError
from ..hooks import eval_mode
from ..io.info import get_info, set_info
from .assemble import Assembly
from .density import DensityProbe, fit_probe

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)


@torch.no_grad()
def assembled_logits(assembly: Assembly, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits before the head, and labels (assembled output indices), of every process's
    batches when `group` is given (gathered in rank order). Shape: (N, T), (N,)."""
    device = next(assembly.parameters()).device
    zs, ys = [], []
    with eval_mode(assembly):
        for x, y in batches:
            zs.append(assembly.logits(x.to(device)).double().cpu())
            ys.append(y.cpu())
    if group is not None:  # every process must take part in the gathers below
        agree_shards(tuple(zs[0].shape[1:]) if zs else None, group, "the assembled logits' shape")
    if not zs:
        raise UserError("no calibration images")
    return gather_rows(torch.cat(zs), group), gather_rows(torch.cat(ys), group)


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


def fit_head(z: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, *, sites: torch.Tensor | None = None,
             owner: torch.Tensor | None = None, l2: float = 1e-3, steps: int = 200
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, bias, per-group energy weight and per-site density weight minimising cross-entropy.

    The fit starts from the raw logits (scale 1, every other term 0), and a small L2 penalty pulls
    towards them, so the head never fits the images worse than no scaling does: its cross-entropy
    on them is at most theirs (up to the optimiser's tolerance). The log-sum-exp terms see the
    logits divided by their spread, so that their weights are on a unit scale. `sites` (N, K) are
    standardised density scores of component `owner` (K,), see `modellego.assembly.density`; without them
    the site weights are empty.
    Shape: z (N, T), y (N,), groups (T,) -> (T,), (T,), (G,), (K,).
    """
    t, g = z.shape[1], int(groups.max()) + 1
    std = z.std().clamp(min=1e-6)
    zn = z / std  # the "mine" confidences on a unit scale (the head's temperature)
    lse = torch.stack([zn[:, groups == k].logsumexp(1) for k in range(g)], 1)  # (N, G)
    if sites is None:
        sites, owner = z.new_zeros(len(z), 0), torch.zeros(0, dtype=torch.long)
    elif owner is None:
        raise UserError("density sites need the component that owns each (`owner`)")
    to_group = F.one_hot(owner, g).to(z.dtype)  # (K, G)
    scale = torch.ones(t, dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(t, dtype=z.dtype, requires_grad=True)
    energy = torch.zeros(g, dtype=z.dtype, requires_grad=True)
    weight = torch.zeros(sites.shape[1], dtype=z.dtype, requires_grad=True)
    params = [scale, bias, energy, weight]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = z * scale + bias + (lse * energy + (sites * weight) @ to_group)[:, groups]
        penalty = (scale - 1).square().sum() + bias.square().sum() + energy.square().sum() + weight.square().sum()
        loss = F.cross_entropy(out, y) + l2 * penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return scale.detach(), bias.detach(), energy.detach(), weight.detach()


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Report = dict[str, object]


def _observed(assembly: Assembly, z: torch.Tensor, y: torch.Tensor, report: Report) -> None:
    """Record how many images the fit saw, and warn about outputs it saw none of."""
    report["images"] = int(len(y))
    missing = sorted(set(range(z.shape[1])) - set(y.tolist()))
    if missing:
        info = get_info(assembly)
        log.warning("no calibration image for outputs %s", [info.class_names[j] for j in missing] if info else missing)
        report["no_images"] = missing


def _scale_none(assembly: Assembly, batches: Batches, report: Report, group: ProcessGroup | None) -> None:
    """The identity head: each component's raw logits."""


@torch.no_grad()
def _scale_paper(assembly: Assembly, batches: Batches, report: Report, group: ProcessGroup | None) -> None:
    z, y = assembled_logits(assembly, batches, group)
    _observed(assembly, z, y, report)
    scale, skipped = paper_scale(z, y)
    assembly.head.scale.copy_(scale.to(assembly.head.scale.dtype))
    report["unscaled"] = skipped
    if skipped:
        log.warning("paper scaling left outputs %s unscaled (no image or a non-positive mean logit)", skipped)


@torch.no_grad()
def _fit_into_head(assembly: Assembly, z: torch.Tensor, y: torch.Tensor, report: Report,
                   probe: DensityProbe | None = None, sites: torch.Tensor | None = None) -> None:
    head = assembly.head
    _observed(assembly, z, y, report)
    scale, bias, energy, weight = fit_head(z, y, head.groups.cpu(), sites=sites,
                                           owner=probe.owner.cpu() if probe is not None else None)
    head.scale.copy_(scale)
    head.bias.copy_(bias)
    head.energy.copy_(energy)
    head.temperature.fill_(float(z.std().clamp(min=1e-6)))
    if probe is not None:
        probe.weight.copy_(weight)
        assembly.probe = probe
        report["density_weight"] = [round(float(v), 4) for v in weight]


def _scale_calibrated(assembly: Assembly, batches: Batches, report: Report, group: ProcessGroup | None) -> None:
    z, y = assembled_logits(assembly, batches, group)
    _fit_into_head(assembly, z, y, report)


def _scale_density(assembly: Assembly, batches: Batches, report: Report, group: ProcessGroup | None) -> None:
    probe, z, y, sites = fit_probe(assembly, batches, group)
    _fit_into_head(assembly, z, y, report, probe, sites)


# Each method fills the (reset) head from training images and notes what it did in the report;
# under a process group, from every process's images.
SCALERS: dict[str, Callable[[Assembly, Batches, Report, ProcessGroup | None], None]] = {
    "none": _scale_none,
    "paper": _scale_paper,
    "calibrated": _scale_calibrated,
    "density": _scale_density,
}
SCALINGS = tuple(SCALERS)


def scale_assembly(assembly: Assembly, batches: Batches, method: str = "density", *,
                   group: ProcessGroup | None = None) -> Report:
    """Set the assembly's head from training images (labels: assembled output indices), in place.

    Args:
        method: one of `SCALINGS`: ``none``, ``paper`` (Eqs. 12-14), ``calibrated`` or
            ``density`` (the calibrated head plus per-component Gaussian scores; the default).
        group: a torch.distributed process group whose every process passes its own share of
            the images: the logits (and density features) of all of them are gathered, so every
            process fits the same head, equal to one process's on all the shards up to the order
            of summation.
    Returns what was done (method, images, skipped outputs, fitted values).
    """
    if method not in SCALERS:
        raise UserError(f"scaling must be one of {SCALINGS}, got {method!r}")
    head = assembly.head
    report: Report = {"method": method}
    with torch.no_grad():
        head.scale.fill_(1)
        head.bias.zero_()
        head.energy.zero_()
        head.temperature.fill_(1)
    assembly.probe = None
    SCALERS[method](assembly, batches, report, group)
    if method != "none":
        report["scale"] = [round(float(v), 5) for v in head.scale]
    info = get_info(assembly)
    if info is not None:
        spec = info.assembly
        if spec is not None:
            spec = dataclasses.replace(spec, density=assembly.probe.spec() if assembly.probe is not None else None)
        set_info(assembly, info.replace(provenance={**info.provenance, "scaling": report}, assembly=spec))
    return report
