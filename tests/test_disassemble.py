"""Disassembling zoo models: the pruned component computes exactly the masked source model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, keep_channels
from modellego.core.profile import Profile
from modellego.cut.disassemble import masked_forward
from modellego.cut.prune import prune_layers
from modellego.errors import UnsupportedGraphError, UserError
from modellego.io.info import get_info, weights_hash

from helpers import NUM_CLASSES, SHAPE, ConvNeXtLike, CrossStage, Ghost, GroupedNet, PartialResidual, Shuffle, randomise_bn
from helpers import zoo_data as data
from helpers import zoo_model as build

ZOO = [
    ("lenet5", 0.25),
    ("alexnet", 0.125),
    ("vgg11_bn", 0.0625),
    ("vgg16_bn", 0.0625),
    ("resnet18", 0.0625),
    ("resnet50", 0.0625),
    ("googlenet", 0.0625),
    ("mobilenet_v2", 0.125),
    ("mobilenet_v3_small", 0.125),
]
pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_output(model: nn.Module, prof: Profile, classes: list[int], x: torch.Tensor) -> torch.Tensor:
    """masked_forward of a float64 copy of `model`, with graph and keep built as disassemble does."""
    m64 = copy.deepcopy(model).double().eval()
    graph = trace(m64, torch.randn(2, *SHAPE, dtype=torch.float64))
    keep = keep_channels(graph, prof.task_in_masks(classes), classes)
    return masked_forward(m64, graph, keep, x.double())[:, classes]


def full_profile(model: nn.Module, classes: list[int]) -> Profile:
    """A profile whose every mask is True (keeps every channel)."""
    graph = trace(model, torch.randn(1, *SHAPE))
    n = len(classes)
    return Profile(
        tuple(classes), tuple(str(c) for c in classes),
        {k: torch.ones(n, layer.in_features, dtype=torch.bool) for k, layer in graph.layers.items()},
        {k: torch.ones(n, layer.out_features, dtype=torch.bool) for k, layer in graph.layers.items()},
        Thresholds(),
        {"model_sha256": weights_hash(model.state_dict()), "input_shape": list(SHAPE)},
    )


@pytest.mark.parametrize("name,width", ZOO, ids=[z[0] for z in ZOO])
def test_component_equals_masked_source(name: str, width: float) -> None:
    model = build(name, width)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    prof = modellego.profile(model, [(x[:12], y[:12]), (x[12:], y[12:])], select=False)
    classes = [3, 1]
    component = modellego.disassemble(model, classes, profile=prof)

    assert n_params(component) < n_params(model)
    info = get_info(component)
    assert info.kind == "component" and info.classes == (3, 1) and info.class_names == ("3", "1")
    assert info.arch == name and info.pruning
    assert not component.training
    # The source is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    x_test = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        got = copy.deepcopy(component).double()(x_test)
    want = expected_output(model, prof, classes, x_test)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # Pruning changed something: the full model's logits differ from the masked ones.
    with torch.no_grad():
        full = copy.deepcopy(model).double()(x_test)[:, classes]
    assert not torch.allclose(full, want, atol=1e-6)


@pytest.mark.parametrize("name,width", [("lenet5", 0.25), ("resnet18", 0.0625), ("googlenet", 0.0625),
                                        ("mobilenet_v2", 0.125), ("mobilenet_v3_small", 0.125)])
def test_keep_all_component_is_the_source(name: str, width: float) -> None:
    model = build(name, width)
    classes = list(range(NUM_CLASSES))
    component = modellego.disassemble(model, classes, profile=full_profile(model, classes))
    assert n_params(component) == n_params(model)
    src, comp = model.state_dict(), component.state_dict()
    assert src.keys() == comp.keys()
    assert all(torch.equal(src[k], comp[k]) for k in src)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(component(x), model(x))


class LinearGateNet(nn.Module):
    """A residual block whose squeeze-and-excitation gate is made of Linear layers (SENet's form), its
    (B, C) output reshaped to scale a (B, C, H, W) map by `view` (the product also in place), or by
    `unsqueeze` and `expand_as` (of the map it scales, or of another map that lends only its shape)."""

    def __init__(self, reshape: str) -> None:
        super().__init__()
        self.reshape = reshape
        self.shape_source = nn.Conv2d(32, 32, 1) if reshape == "expand_as_other" else None
        self.conv0, self.bn0 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.conv0(x)))
        z = self.bn1(self.conv1(h))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(z.mean((2, 3))))))  # (B, C)
        if self.reshape in ("view", "view_in_place"):
            g = g.view(g.size(0), g.size(1), 1, 1)
        elif self.reshape == "expand_as_other":
            g = g.unsqueeze(-1).unsqueeze(3).expand_as(self.shape_source(h))
        else:
            g = g.unsqueeze(-1).unsqueeze(3).expand_as(z)
        if self.reshape == "view_in_place":
            z *= g  # operator.imul, after the gate has read z
            return self.head(torch.relu(z + h).mean((2, 3)))
        return self.head(torch.relu(z * g + h).mean((2, 3)))


class DenseBlockNet(nn.Module):
    """DenseNet's pattern: each convolution reads, through BatchNorm, every map concatenated so far."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, 12, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(28), nn.Conv2d(28, 12, 3, padding=1)
        self.bn3, self.transition = nn.BatchNorm2d(40), nn.Conv2d(40, 20, 1)
        self.bn4, self.head = nn.BatchNorm2d(20), nn.Linear(20, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.cat([h, self.conv1(torch.relu(self.bn1(h)))], 1)  # (B, 28, H, W)
        h = torch.cat([h, self.conv2(torch.relu(self.bn2(h)))], 1)  # (B, 40, H, W)
        h = F.avg_pool2d(self.transition(torch.relu(self.bn3(h))), 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.bn4(h)), 1), 1))


CUSTOM = {"linear_gate_view": lambda: LinearGateNet("view"), "linear_gate_expand": lambda: LinearGateNet("expand"),
          "linear_gate_expand_as_other": lambda: LinearGateNet("expand_as_other"),
          "linear_gate_in_place": lambda: LinearGateNet("view_in_place"), "dense": DenseBlockNet}


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_architectures_are_cut_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = randomise_bn(CUSTOM[name]()).eval()
    x, y = data()
    prof = modellego.profile(model, [(x, y)], select=False)
    classes = [3, 1]
    component = modellego.disassemble(model, classes, profile=prof)
    assert n_params(component) < n_params(model)
    if name == "dense":
        # BatchNorm over a concatenation is cut segment by segment, as the convolution reading it.
        assert component.bn2.num_features == component.conv2.in_channels < 28
        assert component.bn3.num_features == component.transition.in_channels < 40
    else:
        # The gate's rows, the convolutions and the residual stream are one channel space.
        kept = component.conv1.out_channels
        assert component.fc2.out_features == component.conv0.out_channels == component.fc1.in_features == kept < 32
        if component.shape_source is not None:  # lends expand_as its shape: cut to the same channels
            assert component.shape_source.out_channels == kept
    x_test = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        got = copy.deepcopy(component).double()(x_test)
    torch.testing.assert_close(got, expected_output(model, prof, classes, x_test), rtol=0, atol=1e-9)


def test_an_in_place_gate_gives_the_components_of_an_out_of_place_one() -> None:
    """Profiling, cutting and recon's refit read values that `z *= g` overwrites; all must agree."""
    torch.manual_seed(0)
    out_of_place = randomise_bn(LinearGateNet("view")).eval()
    in_place = copy.deepcopy(out_of_place)
    in_place.reshape = "view_in_place"
    x, y = data(40)
    batches = list(zip(x.split(10), y.split(10)))
    states = []
    for model in (out_of_place, in_place):
        prof = modellego.profile(model, batches, select=False)
        states.append(modellego.disassemble(model, [3, 1], profile=prof, calibration=batches).state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=0, atol=1e-6, msg=k)


def test_keep_all_with_reordered_classes_permutes_logits() -> None:
    model = build("resnet18", 0.0625)
    classes = [4, 0, 2, 1, 3]
    component = modellego.disassemble(model, classes, profile=full_profile(model, list(range(NUM_CLASSES))))
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        # same weights, rows permuted: equal up to the order of floating-point sums
        torch.testing.assert_close(component(x), model(x)[:, classes], rtol=0, atol=1e-6)
    assert torch.equal(component.fc.weight, model.fc.weight[classes])
    assert get_info(component).classes == tuple(classes)


def test_disassemble_twice_composes_plans(tmp_path) -> None:
    model = build("resnet18", 0.0625)
    x, y = data()
    first = modellego.disassemble(model, [3, 1, 4], profile=modellego.profile(model, [(x, y)], select=False))
    # The component's outputs are (3, 1, 4): relabel the data in its own output indices.
    y1 = torch.arange(len(x)) % 3
    prof1 = modellego.profile(first, [(x, y1)], select=False)
    second = modellego.disassemble(first, [2, 0], profile=prof1)
    info = get_info(second)
    assert info.classes == (4, 3) and info.class_names == ("4", "3")
    assert info.provenance["source"]["kind"] == "component"
    assert n_params(second) < n_params(first) < n_params(model)

    x_test = torch.randn(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        got = copy.deepcopy(second).double()(x_test)
    torch.testing.assert_close(got, expected_output(first, prof1, [2, 0], x_test), rtol=0, atol=1e-9)

    # The stored plan indexes the ORIGINAL model: replaying it on the source's own weights
    # (no state dict loaded) rebuilds the second component exactly.
    replayed = prune_layers(copy.deepcopy(model), info.pruning).eval()
    assert all(torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), second.state_dict().values()))
    x32 = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(replayed(x32), second(x32))

    path = modellego.save(second, tmp_path / "second")
    loaded = modellego.load(path)
    assert get_info(loaded) == info
    ls, ss = loaded.state_dict(), second.state_dict()
    assert ls.keys() == ss.keys() and all(torch.equal(ls[k], ss[k]) for k in ls)
    with torch.no_grad():
        assert torch.equal(loaded(x32), second(x32))


def test_disassemble_from_batches_and_float64_model() -> None:
    model = build("lenet5", 0.25).double()
    x, y = data()
    component = modellego.disassemble(model, [4, 0], batches=[(x.double(), y)], select=False)
    assert n_params(component) < n_params(model)
    assert next(component.parameters()).dtype == torch.float64
    assert get_info(component).classes == (4, 0)


@pytest.mark.parametrize("classes,match", [([], "no classes"), ([1, 1], "duplicate"), ([5], "out of range"),
                                           ([0, -1], "out of range"), ([2, 7, 2], "duplicate")])
def test_bad_classes_raise_user_error(classes: list[int], match: str) -> None:
    model = build("lenet5", 0.25)
    x, y = data()
    prof = modellego.profile(model, [(x, y)], select=False)
    with pytest.raises(UserError, match=match):
        modellego.disassemble(model, classes, profile=prof)
    # and without a profile (profiling first must not crash instead)
    with pytest.raises(UserError, match=match):
        modellego.disassemble(model, classes, batches=[(x, y)], select=False)


def test_profile_of_another_model_raises_user_error() -> None:
    model, other = build("lenet5", 0.25, seed=0), build("lenet5", 0.25, seed=1)
    x, y = data()
    prof = modellego.profile(model, [(x, y)], select=False)
    with pytest.raises(UserError, match="another model"):
        modellego.disassemble(other, [0, 1], profile=prof)
    with torch.no_grad():  # a single changed weight is another model too
        model.classifier.fc3.bias[0] += 1
    with pytest.raises(UserError, match="another model"):
        modellego.disassemble(model, [0, 1], profile=prof)


class HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).view(-1, 16))


def test_hard_coded_view_is_caught_by_verification() -> None:
    torch.manual_seed(0)
    model = HardCodedView().eval()
    prof = full_profile(model, [0, 1, 2])
    fc_in = torch.zeros(3, 16, dtype=torch.bool)
    fc_in[:, :4] = fc_in[:, 12:] = True  # channels 0 and 3 only
    prof.in_masks["fc"] = fc_in
    with pytest.raises(UnsupportedGraphError, match="hard-codes channel counts"):
        modellego.disassemble(model, [0, 1], profile=prof)


def test_batches_alone_give_the_calibrated_component_drawn_in_the_profiling_pass(profiled) -> None:
    ds, model, _ = profiled
    from modellego.data import batches
    from modellego.evaluation.protocol import model_transform, test_accuracy
    train = list(batches(ds.train, 128, transform=model_transform(model, ds)))
    reads = []

    def once():
        for b in train:
            reads.append(1)
            yield b

    comp = modellego.disassemble(model, [0, 2], batches=once(), calibration_images=100)
    prov = get_info(comp).provenance
    assert len(reads) == len(train)  # profiled and drawn in one reading of a one-shot iterator
    assert prov["calibration"]["method"] == "recon+balance" and prov["calibration"]["images"] == 100
    assert prov["calibration_draw"] == {"images": 100, "from": "batches", "seed": 0}
    faithful = modellego.disassemble(model, [0, 2], batches=train, calibrate="none")
    assert get_info(faithful).provenance["calibration"] == {"method": "none"}
    assert "calibration_draw" not in get_info(faithful).provenance
    assert test_accuracy(comp, ds, [0, 2]).mean_per_class >= 50


def test_a_resnext_block_is_cut_exactly_with_equal_groups() -> None:
    model = GroupedNet().double().eval()
    x = torch.randn(16, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(16) % 5)], select=False)
    graph = trace(model, x[:1])
    keep = keep_channels(graph, prof.task_in_masks([0, 1]), [0, 1], warn=False)
    component = modellego.disassemble(model, [0, 1], profile=prof)
    cut = component.get_submodule("grouped.0")
    assert cut.groups > 1 and cut.out_channels < 12  # still grouped, and smaller
    with torch.no_grad():
        got, want = component(x), masked_forward(model, graph, keep, x)[:, [0, 1]]
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("cls", [CrossStage, PartialResidual, Ghost, Shuffle])
def test_slices_splits_and_shuffles_are_cut_exactly_with_their_channels_kept_whole(cls: type) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(16) % 5)], select=False)
    graph = trace(model, x[:1])
    assert graph.pinned
    keep = keep_channels(graph, prof.task_in_masks([0, 1]), [0, 1], warn=False)
    for s in graph.whole_spaces:
        assert keep[s] == list(range(graph.space_size[s]))
    component = modellego.disassemble(model, [0, 1], profile=prof)
    with torch.no_grad():
        got, want = component(x), masked_forward(model, graph, keep, x)[:, [0, 1]]
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("norm", ["layer", "group", "spatial"])
def test_norms_over_channels_and_layer_scales_keep_their_channels_whole(norm: str) -> None:
    torch.manual_seed(0)
    model = ConvNeXtLike(norm).double().eval()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(16) % 5)], select=False)
    graph = trace(model, x[:1])
    stream = graph.find(graph.segments(graph.layers["stem"].node)[0].space)
    hidden = graph.find(graph.segments(graph.layers["fc1"].node)[0].space)
    # The layer scale `gamma` (one value per channel) pins the stream whatever the norm; the hidden
    # layer of the MLP stays free.
    assert stream in graph.whole_spaces and hidden not in graph.whole_spaces
    keep = keep_channels(graph, prof.task_in_masks([0, 1]), [0, 1], warn=False)
    component = modellego.disassemble(model, [0, 1], profile=prof)
    assert component.get_submodule("fc1").out_channels < 12
    with torch.no_grad():
        got, want = component(x), masked_forward(model, graph, keep, x)[:, [0, 1]]
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


class StdConv(nn.Conv2d):
    """Weight standardisation with a per-filter gain (timm's ScaledStdConv2d, as in NF-ResNets)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-6) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Pyramid(nn.Module):
    """A standardised convolution, and a low-resolution branch upsampled back (HRNet's fuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.std = nn.Conv2d(3, 8, 3, padding=1), StdConv(8, 8, 3, padding=1)
        self.low, self.up = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Upsample(scale_factor=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        low = self.low(h)
        y = torch.relu(self.std(h)) + self.up(low) + F.interpolate(low, scale_factor=2.0)
        return self.fc(y.mean((2, 3)))


def test_standardised_convolutions_keep_their_inputs_and_cut_their_gains() -> None:
    torch.manual_seed(0)
    model = Pyramid().double().eval()
    x = torch.randn(20, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(20) % 5)], select=False)
    graph = trace(model, x[:1])
    assert graph.find(graph.segments(graph.layers["std"].input)[0].space) in graph.whole_spaces
    # Calibrated too: recon leaves the standardised layer as cut (its forward re-derives its filters).
    component = modellego.disassemble(model, [0, 1], profile=prof, calibration=[(x, torch.arange(20) % 5)])
    plain = modellego.disassemble(model, [0, 1], profile=prof)  # verify=True: equals the masked source
    cut = plain.get_submodule("std")
    assert type(cut) is StdConv and cut.in_channels == 8 and cut.out_channels < 8
    assert cut.gain.shape == (cut.out_channels, 1, 1, 1)
    assert torch.equal(component.get_submodule("std").weight, cut.weight)  # not refitted
    assert not torch.equal(component.get_submodule("fc").weight, plain.get_submodule("fc").weight)  # the rest is
