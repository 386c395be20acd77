"""Layer-wise least-squares reconstruction: exact on known targets, optimal on pruned components."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
import modellego.calibration.reconstruct as recon_module
from modellego.calibration.calibrate import calibrate
from modellego.calibration.reconstruct import _conv_rows, _Normal, execution_order, reconstruct, residual_joins
from modellego.core.graph import trace
from modellego.cut.disassemble import relative_error
from modellego.cut.prune import full_plan
from modellego.errors import UserError
from modellego.io.info import get_info
from modellego.memory import FREE_SHARE

from helpers import GroupedNet, _depthwise_net, _perturbed_pair, described_model

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    return list(x.split(n // 2))


def _keep_all_plan(model: nn.Module) -> dict:
    graph = trace(model, torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    return full_plan(graph)


def _padding_net() -> nn.Module:
    """Reflect, circular and asymmetric 'same' padding (an even kernel), and 'valid'."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding="valid"), nn.ReLU(),
        nn.Conv2d(6, 6, (3, 2), padding="same", padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(6, 5, 2, padding="same", dilation=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 5),
    ).eval()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name,images", [("lenet5", 400), ("resnet18", 96), ("depthwise", 96), ("grouped", 96),
                                         ("padding", 96)])
def test_reconstruction_restores_a_perturbed_model(name: str, images: int) -> None:
    """Every layer's target is exactly reachable, so the refit must find the source's weights."""
    if name == "depthwise":
        source = _depthwise_net().double()
    elif name == "grouped":
        source = GroupedNet().double().eval()
    elif name == "padding":
        source = _padding_net().double()
    else:
        source = described_model(name, {"lenet5": 0.5, "resnet18": 0.0625}[name], seed=0, num_classes=5).double()
    broken = copy.deepcopy(source)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.3 * m.weight.std() * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
    x_new = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(broken(x_new), source(x_new), atol=1e-3)
    r2 = reconstruct(broken, source, _keep_all_plan(source), _images(images, 2), ridge=1e-12)
    assert set(r2) == set(execution_order(source, x_new))
    assert min(r2.values()) > 1 - 1e-9
    with torch.no_grad():
        torch.testing.assert_close(broken(x_new), source(x_new), rtol=1e-6, atol=1e-6)


def test_sampled_rows_do_not_depend_on_how_the_images_are_batched() -> None:
    """Rows are keyed by each image's index in the calibration set: batches of 5, 16 or 40 images
    give one fit, which differs from the fit on every position (so rows were sampled)."""
    source = described_model("lenet5", 0.5, seed=0, num_classes=5).double()
    x = torch.cat(_images(40, 3))
    fits = []
    for size, rows in ((5, 8), (16, 8), (40, 8), (40, 10_000)):
        broken = copy.deepcopy(source)
        with torch.no_grad():
            for m in broken.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(0.8)
        reconstruct(broken, source, _keep_all_plan(source), list(x.split(size)), rows_per_image=rows, ridge=0.1)
        fits.append(broken.state_dict())
    for other, differs in ((fits[1], False), (fits[2], False), (fits[3], True)):
        error = max(relative_error(other[k], v) for k, v in fits[0].items())
        assert error > 1e-4 if differs else error < 1e-9, error


def test_normal_equations_equal_a_literal_least_squares_fit() -> None:
    """The streamed, row-sampled normal equations solve the same problem as lstsq on the unfolded input."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(6, 3, 9, 9, generator=g, dtype=torch.float64)
    y = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)  # any target of the right shape
    eqs = _Normal()
    for part_x, part_y in zip(x.split(4), y.split(4)):
        eqs.update(*_conv_rows(conv, part_x, part_y, torch.arange(part_y[:, 0].numel())))  # every position
    w, b, r2 = eqs.solve(ridge=1e-14, intercept=True)
    cols = F.unfold(x, 3, 1, 1, 2).transpose(1, 2).reshape(-1, 27)  # (B*L, P*K)
    design = torch.cat([cols, torch.ones(len(cols), 1, dtype=cols.dtype)], 1)
    target = y.reshape(6, 4, 25).transpose(1, 2).reshape(-1, 4)  # (B*L, Q)
    sol = torch.linalg.lstsq(design, target).solution
    torch.testing.assert_close(w[0], sol[:27], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(b[0], sol[27], rtol=1e-7, atol=1e-9)
    resid = ((design @ sol - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert abs(r2 - (1 - float(resid))) < 1e-9


def test_reconstruction_fits_the_kept_outputs_better_than_the_cut() -> None:
    """On a pruned component, each refitted layer reproduces the source's kept outputs at least as well."""
    source = described_model("vgg11_bn", 0.125, seed=4, num_classes=6, dataset="d")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(96, 1, 28, 28, generator=g)
    y = torch.arange(96) % 6
    prof = modellego.profile(source, [(x, y)], select=False)
    task = [1, 4, 5]
    cut = modellego.disassemble(source, task, profile=prof)
    plan = get_info(cut).pruning
    fitted = copy.deepcopy(cut)
    report = calibrate(fitted, source, task, [(x, y)], "recon", plan=plan)
    assert report["method"] == "recon" and set(report["recon_r2"]) == set(plan) - {
        n for n, m in source.named_modules() if isinstance(m, nn.BatchNorm2d)}
    images = x[torch.isin(y, torch.tensor(task))]
    with torch.no_grad():
        want = source(images)[:, task]
        err_cut = float(((cut(images) - want) ** 2).mean())
        err_fit = float(((fitted(images) - want) ** 2).mean())
    assert err_fit < 0.5 * err_cut
    # The first layer reads the image, whose channels are always kept: its refit leaves it as cut.
    first = execution_order(cut, images)[0]
    assert report["recon_r2"][first] > 0.9999
    torch.testing.assert_close(dict(fitted.named_modules())[first].weight, dict(cut.named_modules())[first].weight,
                               rtol=1e-3, atol=1e-4)


def test_recon_without_a_plan_raises_user_error() -> None:
    source = described_model("lenet5", 0.25, seed=0, num_classes=3)
    x, y = torch.randn(12, 1, 28, 28), torch.arange(12) % 3
    with pytest.raises(UserError, match="pruning plan"):
        calibrate(copy.deepcopy(source), source, [0, 1, 2], [(x, y)], "recon")


def test_recon_reads_the_plan_between_a_component_and_its_source() -> None:
    """A component cut from a component: calibrating it later, without a plan, equals calibrating it when cut."""
    source = described_model("vgg11_bn", 0.125, seed=8, num_classes=6, dataset="d")
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.arange(96) % 6
    outer = modellego.disassemble(source, [5, 1, 3, 4], profile=modellego.profile(source, [(x, y)], select=False))
    prof = modellego.profile(outer, [(x, y)], select=False)  # labels are the dataset's; outputs 0-3 are 5, 1, 3, 4
    when_cut = modellego.disassemble(outer, [2, 0], profile=prof, calibration=[(x, y)], calibrate="recon+balance")
    later = modellego.disassemble(outer, [2, 0], profile=prof)
    report = calibrate(later, outer, [2, 0], [(x, y)], "recon+balance", task_labels=[3, 5])
    assert report["recon_r2"] == get_info(when_cut).provenance["calibration"]["recon_r2"]
    a, b = when_cut.state_dict(), later.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="not cut from this source"):
        calibrate(copy.deepcopy(later), source, [3, 5], [(x, y)], "recon")


def test_disassemble_with_recon_records_the_fit_and_still_loads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = described_model("resnet18", 0.0625, seed=2, num_classes=4, dataset="d")
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 4
    prof = modellego.profile(source, [(x, y)], select=False)
    bars = []
    monkeypatch.setattr(recon_module, "tqdm", lambda it, **kw: bars.append((len(it), kw["disable"])) or it)
    comp = modellego.disassemble(source, [0, 2], profile=prof, calibration=[(x, y)], calibrate="recon+balance",
                                 progress=True)
    r2 = get_info(comp).provenance["calibration"]["recon_r2"]
    assert bars == [(len(r2), None)]  # one bar over the refitted layers, shown on a terminal
    assert len(r2) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in comp.modules())
    back = modellego.load(modellego.save(comp, tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(back(x[:3]), comp(x[:3]))


def test_merge_can_reconstruct_too() -> None:
    source = described_model("vgg11_bn", 0.125, seed=3, num_classes=6, dataset="d")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.arange(96) % 6
    prof = modellego.profile(source, [(x, y)], select=False)
    parts = [modellego.disassemble(source, task, profile=prof) for task in ([0, 1], [4])]
    merged = modellego.merge(source, parts, calibration=[(x, y)], calibrate="recon")
    report = get_info(merged).provenance["calibration"]
    assert report["method"] == "recon" and min(report["recon_r2"].values()) > 0
    images = x[torch.isin(y, torch.tensor([0, 1, 4]))]
    plain = modellego.merge(source, parts)
    with torch.no_grad():
        want = source(images)[:, [0, 1, 4]]
        assert ((merged(images) - want) ** 2).mean() < ((plain(images) - want) ** 2).mean()


def test_a_refused_reconstruction_changes_nothing() -> None:
    source = described_model("lenet5", 0.5, seed=0, num_classes=5).double()
    comp = copy.deepcopy(source)
    with torch.no_grad():
        comp.features.conv1.weight.mul_(2)  # so a refit of the first layer would change it
    plan = _keep_all_plan(source)
    last = execution_order(source, torch.zeros(1, 1, 28, 28, dtype=torch.float64))[-1]
    del plan[last]
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    with pytest.raises(UserError, match=last):
        reconstruct(comp, source, plan, _images(40, 3))
    assert all(torch.equal(before[k], v) for k, v in comp.state_dict().items())


def test_residual_joins_of_a_resnet() -> None:
    """conv2 of every block and every shortcut projection feed an add through one BatchNorm."""
    model = described_model("resnet18", 0.0625, seed=0, num_classes=4)
    joins = residual_joins(torch.fx.symbolic_trace(model))
    want = {f"layer{s}.{b}.conv2" for s in range(1, 5) for b in range(2)} | {
        f"layer{s}.0.downsample.0" for s in range(2, 5)}
    assert set(joins) == want
    assert joins["layer1.0.conv2"].norm == "layer1.0.bn2"
    assert joins["layer2.0.downsample.0"].norm == "layer2.0.downsample.1"
    assert joins["layer2.0.downsample.0"].other == "layer2_0_bn2"  # the branch it is added to


def test_compensating_the_shortcut_brings_the_residual_stream_closer() -> None:
    """With the add's output as target, a pruned ResNet's residual stream follows the source's better."""
    source = described_model("resnet18", 0.125, seed=2, num_classes=6, dataset="d")
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(96, 1, 28, 28, generator=g), torch.arange(96) % 6
    prof = modellego.profile(source, [(x, y)], select=False, keep_contributions=True)
    task = [0, 3, 5]
    cut = modellego.disassemble(source, task, profile=prof, flops=0.5)
    plan = get_info(cut).pruning
    kept = torch.tensor(plan["fc"]["in"])  # channels of the last stream, before pooling
    images = x[torch.isin(y, torch.tensor(task))]

    def error(model: nn.Module) -> float:
        with torch.no_grad():
            return float(((_pooled(model, images) - _pooled(source, images)[:, kept]) ** 2).mean())

    compensated = copy.deepcopy(cut)
    reconstruct(compensated, source, plan, [images])
    plain = copy.deepcopy(cut)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recon_module, "residual_joins", lambda gm: {})
        reconstruct(plain, source, plan, [images])
    assert error(compensated) < 0.8 * error(plain)


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
        model.relu(model.bn1(model.conv1(x)))))))))


@pytest.mark.parametrize("free", [1 << 40, 1000])
def test_recon_holds_values_within_half_the_free_memory_of_the_batches_device(
        free: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With plenty free, one pass of each model; with 1,000 bytes free, the layers resume the models
    from checkpoints; the weights are the same either way."""
    asked: list[torch.device] = []

    def fake_free(device: torch.device | str) -> int:
        asked.append(torch.device(device))
        return free

    monkeypatch.setattr("modellego.memory.free_bytes", fake_free)
    source, broken, plan, images = _perturbed_pair()
    model = copy.deepcopy(broken)
    with caplog.at_level("INFO", logger="modellego"):
        reconstruct(model, source, plan, images)
    assert asked == [images[0].device]
    outgrown = [r.message for r in caplog.records if "outgrow" in r.message]
    assert bool(outgrown) == (free == 1000)
    if outgrown:  # at the first layer: 500 bytes hold less than one image's values
        assert f"outgrow {int(free * FREE_SHARE)} bytes at 0;" in outgrown[0], outgrown
    explicit = copy.deepcopy(broken)
    reconstruct(explicit, source, plan, images, memory_budget=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k


def test_a_negative_budget_is_refused_before_anything_changes() -> None:
    source, broken, plan, images = _perturbed_pair()
    model = copy.deepcopy(broken)
    with pytest.raises(UserError, match="memory_budget must be a number of bytes >= 0, got -1"):
        reconstruct(model, source, plan, images, memory_budget=-1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, broken.state_dict()[k]), k


class LateOperand(nn.Module):
    """An add whose other operand is computed after the layer that feeds it (HRNet's fuse layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.side, self.main = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        side = self.side(h)
        y = self.main(h) + torch.relu(side)  # relu(side) runs after self.main
        return self.fc(y.mean((2, 3)))


def test_reconstruction_with_an_operand_computed_after_the_layer() -> None:
    source = LateOperand().double().eval()
    joins = residual_joins(trace(source, torch.zeros(1, 1, 28, 28, dtype=torch.float64)).gm)
    assert "main" in joins  # a join whose operand is not known when the layer runs: not compensated
    broken = copy.deepcopy(source)
    with torch.no_grad():
        broken.main.weight.mul_(1.5)
    r2 = reconstruct(broken, source, _keep_all_plan(source), _images(96, 2), ridge=1e-12)
    assert min(r2.values()) > 1 - 1e-9
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(broken(x), source(x), rtol=1e-6, atol=1e-6)
