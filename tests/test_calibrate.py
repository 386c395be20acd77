"""Calibrating a component: what each method touches, and the closed-form fits by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.calibration.calibrate import calibrate, fit_affine, fit_balance, fit_ridge, last_layer, parse_methods, recompute_batchnorm
from modellego.errors import UserError
from modellego.io.info import InputSpec, get_info, set_info

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def _vgg_component(seed: int = 0):
    torch.manual_seed(seed)
    model = modellego.create_model("vgg11_bn", num_classes=6, in_channels=1, width=0.0625)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
    model = set_info(model.eval(), get_info(model).replace(input=InputSpec(1, (28, 28), (0.1,), (0.3,)), dataset="d"))
    x = torch.randn(48, 1, 28, 28, generator=g)
    y = torch.arange(48) % 6
    prof = modellego.profile(model, [(x, y)], select=False)
    return model, modellego.disassemble(model, [1, 4, 5], profile=prof), [(x[:24], y[:24]), (x[24:], y[24:])]


@pytest.fixture(scope="module")
def vgg():
    return _vgg_component()


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("method,allowed", [
    ("bn", "bn"), ("affine", "fc"), ("refit", "fc"), ("balance", "bias"), ("bn+affine", "bn+fc"),
    ("none", "nothing"), ("recon", "layers"),
])
def test_each_calibration_touches_only_what_it_names(vgg, method: str, allowed: str) -> None:
    source, comp, data = vgg
    comp = copy.deepcopy(comp)
    fc_name = next(n for n, m in comp.named_modules() if m is last_layer(comp, 3))
    bn_names = {n for n, m in comp.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    src_before = {k: v.clone() for k, v in source.state_dict().items()}
    report = calibrate(comp, source, [1, 4, 5], data, method, plan=get_info(comp).pruning)
    changed = _changed(before, comp.state_dict())
    assert not _changed(src_before, source.state_dict())  # the source is never touched
    bn_keys = {k for k in before if k.rsplit(".", 1)[0] in bn_names and k.rsplit(".", 1)[1] in BN_BUFFERS}
    fc_keys = {f"{fc_name}.weight", f"{fc_name}.bias"}
    layer_keys = {f"{n}.{p}" for n, m in comp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  for p, _ in m.named_parameters()}
    want = {"bn": bn_keys, "fc": fc_keys, "bias": {f"{fc_name}.bias"}, "bn+fc": bn_keys | fc_keys,
            "nothing": set(), "layers": layer_keys}[allowed]
    assert changed == want
    assert report["method"] == method
    if "bn" in method:
        assert report["bn_layers"] == len(bn_names) > 0
    if method != "none":
        assert report["images"] == 3 * 8


def test_recompute_batchnorm_is_the_exact_average(vgg) -> None:
    _, comp, data = vgg
    comp = copy.deepcopy(comp)
    first_bn = next(m for m in comp.modules() if isinstance(m, nn.BatchNorm2d))
    first_conv = next(m for m in comp.modules() if isinstance(m, nn.Conv2d))
    assert recompute_batchnorm(comp, [x for x, _ in data]) > 0
    with torch.no_grad():
        h = first_conv(torch.cat([x for x, _ in data]))
    torch.testing.assert_close(first_bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)
    assert first_bn.momentum == 0.1 and not comp.training


@pytest.mark.parametrize("method", ["bogus", "bn+bogus", "", "+", "BN"])
def test_unknown_calibration_raises_user_error(vgg, method: str) -> None:
    source, comp, data = vgg
    with pytest.raises(UserError, match="unknown calibration"):
        calibrate(copy.deepcopy(comp), source, [1, 4, 5], data, method)
    assert parse_methods(" bn + refit ") == ["bn", "refit"] and parse_methods("none") == []


def test_calibration_without_task_images_raises_user_error(vgg) -> None:
    source, comp, data = vgg
    others = [(x[(y == 0) | (y == 2)], y[(y == 0) | (y == 2)]) for x, y in data]
    with pytest.raises(UserError, match="no calibration image"):
        calibrate(copy.deepcopy(comp), source, [1, 4, 5], others, "affine")


def test_calibration_needing_a_bias_fails_before_changing_anything(vgg) -> None:
    source, comp, data = vgg
    for method in ("affine", "refit", "balance"):
        c = copy.deepcopy(comp)
        fc = last_layer(c, 3)
        fc.bias = None
        before = {k: v.clone() for k, v in c.state_dict().items()}
        with pytest.raises(UserError, match="bias"):
            calibrate(c, source, [1, 4, 5], data, "bn+" + method)
        assert not _changed(before, c.state_dict())


def test_fit_ridge_recovers_a_linear_map() -> None:
    g = torch.Generator().manual_seed(4)
    h = torch.randn(300, 8, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    target = h @ w.T + b
    w_hat, b_hat = fit_ridge(h, target, ridge=1e-12)
    torch.testing.assert_close(w_hat, w, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b_hat, b, rtol=1e-8, atol=1e-8)
    w_hat, b_hat = fit_ridge(h, target)  # the default ridge shrinks only a little
    torch.testing.assert_close(w_hat, w, rtol=0, atol=2e-2)
    assert float(w_hat.norm()) < float(w.norm())


def test_refit_recovers_a_known_last_layer(vgg) -> None:
    _, comp, data = vgg
    comp = copy.deepcopy(comp)
    # A "source" whose task logits are a known linear map of the component's penultimate features.
    source = copy.deepcopy(comp)
    fc_src = last_layer(source, 3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        fc_src.weight.copy_(torch.randn(fc_src.weight.shape, generator=g))
        fc_src.bias.copy_(torch.randn(3, generator=g))
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.arange(len(x_all)) % 3  # every image counts as a task image
    fit = [(x_all, y_all)]
    with torch.no_grad():
        assert not torch.allclose(comp(x_all), source(x_all), atol=1e-2)
    report = calibrate(comp, source, [0, 1, 2], fit, "refit")
    assert report["refit_r2"] > 0.999
    x_new = torch.randn(8, 1, 28, 28, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(comp(x_new), source(x_new), rtol=1e-2, atol=1e-2 * float(source(x_new).abs().max()))


def test_fit_affine_and_fit_balance() -> None:
    g = torch.Generator().manual_seed(6)
    z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    target = torch.stack([2 * z[:, 0] + 1, -z[:, 1], torch.zeros(50, dtype=torch.float64)], 1)
    z[:, 2] = 4.0  # a constant column keeps scale 1
    a, b = fit_affine(z, target)
    torch.testing.assert_close(a, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))  # negative slope clamped
    torch.testing.assert_close(b, torch.tensor([1.0, float(target[:, 1].mean()), -4.0], dtype=torch.float64))

    z = torch.randn(300, 3, generator=g, dtype=torch.float64)
    z[:, 0] += 3  # class 0 wins almost always
    prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    bias = fit_balance(z, prior)
    freq = torch.bincount((z + bias).argmax(1), minlength=3).double() / 300
    assert float((freq - prior).abs().max()) < 0.05
    assert abs(float(bias.sum())) < 1e-9
