"""Per-component Gaussian density scores: the closed-form fit and the score against a literal formula."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import modellego
from modellego.assembly.assemble import assemble
from modellego.assembly.density import DensityProbe, fit_gaussian, pooled
from modellego.assembly.scaling import scale_assembly
from modellego.errors import UserError
from modellego.io.info import get_info, set_info

from helpers import _assembly, _fit_images

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def test_fit_gaussian_means_and_whitening_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(50) % 3 + 5  # any label values
    means, white = fit_gaussian(h, labels, shrink=0.2)
    want_means = torch.stack([h[labels == c].mean(0) for c in (5, 6, 7)])
    torch.testing.assert_close(means, want_means)
    centred = torch.cat([h[labels == c] - h[labels == c].mean(0) for c in (5, 6, 7)])
    cov = centred.T @ centred / 50
    cov += 0.2 * cov.trace() / 4 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(white @ white.T, torch.linalg.inv(cov))
    assert torch.equal(white, white.tril())  # a Cholesky factor


def test_site_score_is_the_mahalanobis_mixture_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    h_fit = torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(40) % 2
    means, white = fit_gaussian(h_fit, labels)
    probe = DensityProbe([(0, "layer", 3, 2)], 1).double()
    probe.positions_0 = torch.tensor([2, 0, 1])
    probe.means_0, probe.whiten_0 = means, white
    x = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)  # a layer input (B, C, H, W)
    feats = pooled(x)[:, [2, 0, 1]]
    precision = white @ white.T
    want = []
    for b in range(5):
        terms = [-0.5 * float((feats[b] - means[c]) @ precision @ (feats[b] - means[c])) for c in range(2)]
        want.append(math.log(sum(math.exp(t) for t in terms)) / 3)
    got = probe.site_scores({"layer": pooled(x)})
    torch.testing.assert_close(got[:, 0], torch.tensor(want, dtype=torch.float64))
    # Standardised and weighted into the owner's column.
    probe.loc.fill_(0.5)
    probe.spread.fill_(2.0)
    probe.weight.fill_(3.0)
    torch.testing.assert_close(probe({"layer": pooled(x)})[:, 0], 3.0 * (got[:, 0] - 0.5) / 2.0)


def test_pooled_keeps_2d_inputs_and_averages_maps() -> None:
    x = torch.arange(24.0).view(2, 3, 2, 2)
    torch.testing.assert_close(pooled(x), x.mean((2, 3)))
    assert torch.equal(pooled(x[:, :, 0, 0]), x[:, :, 0, 0])


@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_density_adds_one_score_per_component_and_round_trips(trained, mode: str, tmp_path) -> None:
    ds, _, comps = trained
    asm = assemble([copy.deepcopy(c) for c in comps], mode=mode)
    _, fit = _fit_images(asm, ds)
    report = scale_assembly(asm, fit, "density")
    assert asm.probe is not None and len(report["density_weight"]) == len(asm.probe.layers) > 2
    x = fit[0][0][:16]
    with torch.no_grad():
        extra = asm(x) - asm.head(asm.logits(x))  # (B, T): the density term alone
    groups = asm.head.groups
    for g in range(2):  # the same number on every output of one component: its "mine" score
        torch.testing.assert_close(extra[:, groups == g], extra[:, groups == g][:, :1].expand(-1, 3), rtol=0, atol=1e-5)
    assert not torch.allclose(extra[:, 0], extra[:, 3])
    assert get_info(asm).assembly.density == asm.probe.spec()
    back = modellego.load(modellego.save(asm, tmp_path / "asm.safetensors"))
    assert back.probe is not None and back.probe.layers == asm.probe.layers
    with torch.no_grad():
        assert torch.equal(back(x), asm(x))
    # Another scaling removes the probe, from the model and from its description.
    scale_assembly(back, fit, "calibrated")
    assert back.probe is None and get_info(back).assembly.density is None
    assert not any(k.startswith("probe.") for k in back.state_dict())


def test_density_needs_recorded_layer_inputs(trained) -> None:
    ds, _, comps = trained
    asm = _assembly(comps)
    info = get_info(asm)
    set_info(asm, info.replace(assembly=dataclasses.replace(info.assembly, layer_inputs={})))
    _, fit = _fit_images(asm, ds)
    with pytest.raises(UserError, match="assemble it again"):
        scale_assembly(asm, fit, "density")
