"""Scaling an assembly's head: paper Eqs. 12-14 by hand, and the paper's and the calibrated head on
trained components (conftest's `trained`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modellego.assembly.assemble import Assembly, OutputHead
from modellego.assembly.scaling import assembled_logits, fit_head, paper_scale, scale_assembly
from modellego.data import batches
from modellego.errors import UserError
from modellego.evaluation.protocol import model_transform
from modellego.evaluation.protocol import test_accuracy as accuracy_on
from modellego.io.info import get_info

from helpers import _assembly, _fit_images

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


# ---------------------------------------------------------------------------------------------
# Eqs. 12-14 by hand

def test_paper_scale_matches_eqs_12_to_14_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(40, 4, generator=g, dtype=torch.float64) * 5 + 0.5  # positive logits
    y = torch.arange(40) % 4
    scale, skipped = paper_scale(z, y)
    e = [float(sum(z[i, j] for i in range(40) if y[i] == j) / sum(1 for i in range(40) if y[i] == j))
         for j in range(4)]
    e_bar = sum(e) / 4
    assert skipped == []
    assert scale.dtype == torch.float64
    torch.testing.assert_close(scale, torch.tensor([e_bar / ej for ej in e], dtype=torch.float64), rtol=1e-12, atol=0)
    # After scaling every class's mean logit on its own images is ē.
    scaled = z * scale
    for j in range(4):
        assert float(scaled[y == j, j].mean()) == pytest.approx(e_bar, rel=1e-12)


def test_paper_scale_keeps_classes_without_images_or_positive_mean_and_reports_them() -> None:
    z = torch.tensor([[2.0, -1.0, 9.0, 0.0, 3.0],
                      [4.0, -3.0, 9.0, 0.0, 1.0],
                      [1.0, 5.0, 9.0, 0.0, 6.0],
                      [1.0, 5.0, 9.0, 0.0, 6.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 3, 4])  # class 2 has no image; class 1 a negative mean; class 3 a zero mean
    scale, skipped = paper_scale(z, y)
    assert skipped == [1, 2, 3]
    assert torch.isfinite(scale).all()
    e0, e4 = 2.0, 6.0  # logit of class 0 on image 0, of class 4 on image 3; ē over the scaled classes only
    torch.testing.assert_close(scale, torch.tensor([4.0 / e0, 1, 1, 1, 4.0 / e4], dtype=torch.float64))
    # Nothing positive at all: every scale stays 1.
    scale, skipped = paper_scale(-z.abs() - 1, y)
    assert skipped == [0, 1, 2, 3, 4] and torch.equal(scale, torch.ones(5, dtype=torch.float64))


def test_paper_scale_is_invariant_to_a_uniform_positive_factor() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30, 3, generator=g, dtype=torch.float64) + 2
    y = torch.arange(30) % 3
    s1, _ = paper_scale(z, y)
    s7, _ = paper_scale(7 * z, y)
    torch.testing.assert_close(s1, s7)
    # A uniform positive scale in the head leaves every argmax unchanged.
    head = OutputHead([0, 0, 1])
    head.scale.fill_(3.5)
    out = head(z.float())
    assert torch.equal(out.argmax(1), z.float().argmax(1))
    torch.testing.assert_close(out, 3.5 * z.float())


def test_fit_head_never_produces_nan_and_lowers_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 4
    z = torch.randn(60, 4, generator=g, dtype=torch.float64)
    z[torch.arange(60), y] += 1.0
    z[:, 2:] *= 10  # the second component shouts
    groups = torch.tensor([0, 0, 1, 1])
    scale, bias, energy, weight = fit_head(z, y, groups)
    assert all(torch.isfinite(t).all() for t in (scale, bias, energy)) and weight.shape == (0,)
    std = z.std()
    lse = torch.stack([(z / std)[:, groups == k].logsumexp(1) for k in range(2)], 1)
    out = z * scale + bias + (lse * energy)[:, groups]
    assert F.cross_entropy(out, y) < F.cross_entropy(z, y)


# ---------------------------------------------------------------------------------------------
# A trained source's components and their assembly (conftest's `trained`)


def test_none_leaves_outputs_identical_to_the_raw_logits(trained) -> None:
    ds, _, comps = trained
    asm = _assembly(comps)
    _, fit = _fit_images(asm, ds)
    x = fit[0][0][:16]
    scale_assembly(asm, fit, "paper")
    assert not torch.equal(asm(x), asm.logits(x))
    report = scale_assembly(asm, fit, "none")
    assert report == {"method": "none"}
    assert torch.equal(asm.head.scale, torch.ones(6)) and torch.equal(asm.head.bias, torch.zeros(6))
    assert not bool((asm.head.energy != 0).any()) and float(asm.head.temperature) == 1.0
    assert torch.equal(asm(x), asm.logits(x))
    assert get_info(asm).provenance["scaling"]["method"] == "none"


@pytest.mark.parametrize("method", ["paper", "calibrated", "density"])
def test_scaling_changes_only_the_head(trained, method: str) -> None:
    ds, _, comps = trained
    asm = _assembly(comps)
    _, fit = _fit_images(asm, ds)
    x = fit[0][0][:16]
    before = {k: v.clone() for k, v in asm.state_dict().items()}
    logits = asm.logits(x)
    report = scale_assembly(asm, fit, method)
    after = asm.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after) and all(k.startswith("probe.") for k in added) and bool(added) == (method == "density")
    body = [k for k in before if not k.startswith("head.")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert torch.equal(asm.logits(x), logits)
    assert report["method"] == method and report["images"] == 6 * 60
    assert get_info(asm).provenance["scaling"] == report


def test_paper_scaling_sets_the_head_to_eqs_12_to_14(trained) -> None:
    ds, _, comps = trained
    asm = _assembly(comps)
    _, fit = _fit_images(asm, ds)
    z, y = assembled_logits(asm, fit)
    want, skipped = paper_scale(z, y)
    report = scale_assembly(asm, fit, "paper")
    assert report["unscaled"] == skipped == []
    torch.testing.assert_close(asm.head.scale, want.float())
    x = fit[0][0][:16]
    torch.testing.assert_close(asm(x), asm.logits(x) * want.float())


def test_paper_scaling_without_images_of_a_class_keeps_it_unscaled(trained) -> None:
    ds, _, comps = trained
    asm = _assembly(comps)
    _, fit = _fit_images(asm, ds)
    no4 = [(x[y != 4], y[y != 4]) for x, y in fit]
    report = scale_assembly(asm, no4, "paper")
    assert report["no_images"] == [4] and 4 in report["unscaled"]
    assert float(asm.head.scale[4]) == 1.0 and torch.isfinite(asm.head.scale).all()
    assert torch.isfinite(asm(fit[0][0])).all()
    report = scale_assembly(asm, no4, "calibrated")  # the fitted head stays finite too
    assert report["no_images"] == [4]
    assert all(torch.isfinite(t).all() for t in (asm.head.scale, asm.head.bias, asm.head.energy))


def test_paper_scaled_predictions_ignore_an_inflated_component(trained) -> None:
    ds, _, comps = trained
    preds = []
    for inflate in (1.0, 10.0):
        asm = _assembly(comps, inflate)
        union, fit = _fit_images(asm, ds)
        assert scale_assembly(asm, fit, "paper")["unscaled"] == []
        with torch.no_grad():
            x = next(iter(batches(union.test, 1000, transform=model_transform(asm, union))))[0]
            preds.append(asm(x).argmax(1))
    # Scaled outputs differ by one positive factor overall: the same argmax everywhere.
    assert torch.equal(preds[0], preds[1])


def _train_ce(asm: Assembly, fit) -> float:
    z, y = assembled_logits(asm, fit)
    with torch.no_grad():
        return float(F.cross_entropy(asm.head(z.float()).double(), y))


@pytest.mark.parametrize("inflate", [1.0, 10.0])
def test_calibrated_does_not_raise_the_training_cross_entropy(trained, inflate: float) -> None:
    ds, _, comps = trained
    asm = _assembly(comps, inflate)
    _, fit = _fit_images(asm, ds)
    scale_assembly(asm, fit, "none")
    ce_none = _train_ce(asm, fit)
    scale_assembly(asm, fit, "calibrated")
    ce_cal = _train_ce(asm, fit)
    assert ce_cal <= ce_none


def test_calibrated_and_density_restore_accuracy_of_an_inflated_component(trained) -> None:
    ds, _, comps = trained
    acc = {}
    for inflate in (1.0, 10.0):
        asm = _assembly(comps, inflate)
        union, fit = _fit_images(asm, ds)
        for method in ("none", "calibrated", "density"):
            scale_assembly(asm, fit, method)
            acc[inflate, method] = accuracy_on(asm, union).mean_per_class  # held-out test images
    # Inflating one component's logits ten-fold hurts the raw assembly...
    assert acc[10.0, "none"] < acc[1.0, "none"] - 15
    # ...and the fitted heads, fitted on training images only, bring it back.
    for method in ("calibrated", "density"):
        assert acc[10.0, method] > acc[10.0, "none"] + 15
        assert acc[10.0, method] >= acc[1.0, "none"] - 5


def test_bad_scaling_arguments_raise_user_error(trained) -> None:
    _, _, comps = trained
    asm = _assembly(comps)
    with pytest.raises(UserError, match="scaling must be one of"):
        scale_assembly(asm, [], "temperature")
    with pytest.raises(UserError, match="no calibration images"):
        scale_assembly(asm, [], "paper")
