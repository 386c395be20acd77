"""A "not mine" score for every component of an assembly: Gaussian densities of its own features.

Components that never met in training are each confident on images they have never seen, so their
logits alone decide poorly which component an image belongs to (MNIST "1" or Fashion "Trouser"?).
Each component, though, knows what ITS inputs look like. For every layer of component g, the
channel means of the layer's input (the features themselves for a 2-D input) are modelled as
class-conditional Gaussians with one shared, shrunk covariance, fitted in closed form on training
images of g's own classes (the Mahalanobis detector of Lee et al., NeurIPS 2018, one per layer).
On an image, site k scores

    d_k(x) = logsumexp_c( -½ ‖(h_k(x) - μ_{k,c}) L_k‖² ) / F_k,      L_k L_kᵀ = Σ_k⁻¹,

standardised over the fitting images, and component g's score is Σ_{k of g} w_k d_k(x), added to
all of g's outputs. The weights w_k are fitted with the rest of the head (`modellego.assembly.scaling`):
one number per layer and component. No network weight changes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import torch
import torch.nn as nn

from ..core.distributed import agree_shards, gather_rows
from ..errors import UserError
from ..hooks import eval_mode, forward_hooks
from ..io.info import DensitySite, get_info

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .assemble import Assembly

MAX_FEATURES = 1024  # layers whose per-component input is wider get no Gaussian (a dense covariance)
SHRINK = 0.1  # covariance shrinkage towards its mean variance (robust with ~200 images per class)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Site:
    """One layer input of one component, as seen inside the assembly's body.

    Attributes:
        component: the component (output group).
        layer: module name inside the body.
        positions: indices of the component's features in that layer's pooled input.
    """

    component: int
    layer: str
    positions: tuple[int, ...]


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Channel means of a feature map, or the features of a 2-D input. Shape: (B, C, ...) -> (B, C)."""
    return x.flatten(2).mean(2) if x.ndim > 2 else x


class DensityProbe(nn.Module):
    """Per-component density scores of an assembly's body. Shape: features per site -> (B, G).

    Buffers per site k: ``positions_k`` (F,), ``means_k`` (n_g, F), ``whiten_k`` (F, F); and over
    all sites ``owner`` (K,), ``loc`` / ``spread`` (K,) to standardise, ``weight`` (K,).
    """

    owner: torch.Tensor
    loc: torch.Tensor
    spread: torch.Tensor
    weight: torch.Tensor

    def __init__(self, sites: Sequence[tuple[int, str, int, int]], num_components: int) -> None:
        """`sites`: (component, layer, features, classes) of each site."""
        super().__init__()
        self.layers = [layer for _, layer, _, _ in sites]
        self.num_components = num_components
        for k, (_, _, f, n) in enumerate(sites):
            self.register_buffer(f"positions_{k}", torch.zeros(f, dtype=torch.long))
            self.register_buffer(f"means_{k}", torch.zeros(n, f))
            self.register_buffer(f"whiten_{k}", torch.zeros(f, f))
        self.register_buffer("owner", torch.as_tensor([c for c, _, _, _ in sites], dtype=torch.long))
        self.register_buffer("loc", torch.zeros(len(sites)))
        self.register_buffer("spread", torch.ones(len(sites)))
        self.register_buffer("weight", torch.zeros(len(sites)))

    def spec(self) -> tuple[DensitySite, ...]:
        """Shapes to rebuild the probe from a file."""
        return tuple(DensitySite(int(c), layer, int(getattr(self, f"positions_{k}").numel()),
                                 int(getattr(self, f"means_{k}").shape[0]))
                     for k, (c, layer) in enumerate(zip(self.owner.tolist(), self.layers)))

    def site_scores(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw d_k for every site, from the pooled inputs of the body's layers. Shape: (B, K)."""
        cols = []
        for k, layer in enumerate(self.layers):
            h = inputs[layer][:, getattr(self, f"positions_{k}")]  # (B, F)
            means = getattr(self, f"means_{k}").to(h.dtype)  # (n, F)
            white = getattr(self, f"whiten_{k}").to(h.dtype)  # (F, F)
            d2 = ((h @ white)[:, None, :] - (means @ white)[None]).square().sum(-1)  # (B, n)
            cols.append(torch.logsumexp(-0.5 * d2, 1) / h.shape[1])
        return torch.stack(cols, 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_k w_k · standardised d_k per component. Shape: (B, G)."""
        raw = self.site_scores(inputs)  # (B, K)
        d = (raw - self.loc.to(raw.dtype)) / self.spread.to(raw.dtype)
        out = d.new_zeros(d.shape[0], self.num_components)
        return out.index_add_(1, self.owner, d * self.weight.to(d.dtype))


def capture(body: nn.Module, layers: Iterable[str], run: Callable[[], _T]) -> tuple[_T, dict[str, torch.Tensor]]:
    """Run `run()` with the pooled inputs of `layers` of `body` recorded; returns (result, inputs)."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = pooled(args[0])  # reduced at once: later in-place ops cannot alter it
        return hook

    with forward_hooks(body, {name: hook_for(name) for name in dict.fromkeys(layers)}, pre=True, eval_mode=False):
        result = run()
    return result, seen


@torch.no_grad()
def fit_gaussian(h: torch.Tensor, labels: torch.Tensor, shrink: float = SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and a whitening matrix of the shared, shrunk covariance. Shape: (N, F) -> (n, F), (F, F)."""
    classes = labels.unique()
    means = torch.stack([h[labels == c].mean(0) for c in classes])  # (n, F)
    centred = h - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(h)  # (F, F)
    cov = cov + shrink * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov), dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    return means, torch.linalg.cholesky((precision + precision.T) / 2)


def sites_of(assembly: Assembly) -> list[Site]:
    """Every layer input of every component that gets a Gaussian (at most `MAX_FEATURES` features)."""
    info = get_info(assembly)
    spec = info.assembly if info else None
    sites: list[Site] = []
    if spec is not None and spec.mode == "parallel":
        for g, comp in enumerate(cast(nn.ModuleList, assembly.body)):  # a parallel body lists the components
            for name, m in comp.named_modules():
                f = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features if isinstance(m, nn.Linear) else None
                if f is not None and f <= MAX_FEATURES:
                    sites.append(Site(g, f"{g}.{name}", tuple(range(f))))
    elif spec is not None and spec.mode == "padded":
        for name, per_component in spec.layer_inputs.items():
            sites += [Site(g, name, tuple(p)) for g, p in enumerate(per_component) if 0 < len(p) <= MAX_FEATURES]
    if not sites:
        raise UserError("this assembly records no layer inputs for density scores; assemble it again with this version")
    return sites


@torch.no_grad()
def fit_probe(assembly: Assembly, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              group: ProcessGroup | None = None) -> tuple[DensityProbe, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit every site's Gaussian on the images of its own component's classes.

    Under `group`, every process passes its share of the images and all of them are gathered
    (pooled features, at most `MAX_FEATURES` per site and image), so every process fits the same.

    Returns the probe (weights zero), the raw logits (N, T), labels (N,) and standardised site
    scores (N, K) of the fitting images, for the head's fit.
    """
    sites = sites_of(assembly)
    groups = assembly.head.groups.cpu()
    device = next(assembly.parameters()).device
    feats: dict[str, list[torch.Tensor]] = {s.layer: [] for s in sites}
    zs, ys = [], []
    with eval_mode(assembly):
        for x, y in batches:
            z, seen = capture(assembly.body, feats, functools.partial(assembly.logits, x.to(device)))
            zs.append(z.double().cpu())
            ys.append(y.cpu())
            for name in feats:
                feats[name].append(seen[name].double().cpu())
    if group is not None:  # every process must take part in the gathers below
        agree_shards(tuple(zs[0].shape[1:]) if zs else None, group, "the assembled logits' shape")
    if not zs:
        raise UserError("no calibration images")
    z, y = gather_rows(torch.cat(zs), group), gather_rows(torch.cat(ys), group)
    inputs = {name: gather_rows(torch.cat(v), group) for name, v in feats.items()}
    probe = DensityProbe([(s.component, s.layer, len(s.positions), 0) for s in sites], len(groups.unique()))
    group_of = groups[y]
    for k, s in enumerate(sites):
        own = group_of == s.component
        if int(own.sum()) < 2:
            raise UserError(f"density scores need training images of component {s.component}'s classes")
        pos = torch.as_tensor(s.positions, dtype=torch.long)
        means, white = fit_gaussian(inputs[s.layer][own][:, pos], y[own])
        setattr(probe, f"positions_{k}", pos)
        setattr(probe, f"means_{k}", means.float().contiguous())
        setattr(probe, f"whiten_{k}", white.float().contiguous())  # as stored in a file: results identical after loading
    raw = probe.double().site_scores(inputs)  # (N, K)
    probe.loc.copy_(raw.mean(0))
    probe.spread.copy_(raw.std(0).clamp(min=1e-9))
    standardised = (raw - probe.loc) / probe.spread
    return probe.float().to(device), z, y, standardised
