"""Per-component Gaussian density scores: the closed-form fit and the score against a literal formula."""
from __future__ import annotations

import math

import torch

from modellego.assembly.density import DensityProbe, fit_gaussian, pooled


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
