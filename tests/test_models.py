"""Tests for the model registry and every registered model family."""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx
from torch import nn

from modellego.errors import UnknownNameError, UserError
from modellego.models import classifier_layer, create_model, list_models, register_model, registry, scaled

ALL_MODELS = list_models()
# Small widths keep the big networks fast on two CPU cores.
TEST_WIDTH = {"lenet5": 1.0, "alexnet": 0.25}
DEFAULT_TEST_WIDTH = 0.125


def build(name: str, *, seed: int = 0, **kwargs: object) -> nn.Module:
    kwargs.setdefault("width", TEST_WIDTH.get(name, DEFAULT_TEST_WIDTH))
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_families_registered() -> None:
    expected = {
        "lenet5", "alexnet", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
        "resnet18", "resnet34", "resnet50", "googlenet", "mobilenet_v2", "mobilenet_v3_small",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape(name: str, in_channels: int) -> None:
    model = build(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        for size in (28, 32, 64):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, 7), (name, size)
            assert torch.isfinite(out).all()
    # Non-square inputs work too, and train mode (batch-stat BN) runs.
    model.train()
    assert model(torch.randn(2, in_channels, 28, 36)).shape == (2, 7)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_symbolic_trace_matches_eager(name: str) -> None:
    model = build(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)

    # Every layer call is a distinct named module (no reuse of one ReLU or pool),
    # so graph tools can attach activations to nodes unambiguously.
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert len(targets) == len(set(targets))
    # In-place activations would overwrite tensors the graph tools want to record.
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            assert not module.inplace


@pytest.mark.parametrize("name", ALL_MODELS)
def test_construction_is_deterministic(name: str) -> None:
    a = build(name, seed=123).state_dict()
    b = build(name, seed=123).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build(name, seed=124).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_width_reduces_parameter_count(name: str) -> None:
    wide = TEST_WIDTH.get(name, 0.25)
    assert n_params(build(name, width=wide / 2)) < n_params(build(name, width=wide))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_classifier_layer_is_final_linear(name: str) -> None:
    model = build(name, num_classes=5)
    layer_name, layer = classifier_layer(model)
    assert isinstance(layer, nn.Linear)
    assert layer.out_features == 5
    assert model.get_submodule(layer_name) is layer
    # The graph's output is produced directly by that layer.
    graph = torch.fx.symbolic_trace(model).graph
    output = next(n for n in graph.nodes if n.op == "output")
    (result,) = output.args
    assert result.op == "call_module" and result.target == layer_name


def test_classifier_layer_without_linear() -> None:
    with pytest.raises(UserError, match="no nn.Linear"):
        classifier_layer(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("vgg16")
    message = str(info.value)
    assert "vgg16_bn" in message
    assert "resnet18" in message  # the known names are listed
    assert not message.startswith(("'", '"'))  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)


def test_names_are_case_and_dash_insensitive() -> None:
    model = create_model("VGG11-BN", width=0.0625)
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": -3},
        {"num_classes": 2.5},
        {"num_classes": True},
        {"in_channels": 0},
        {"in_channels": "3"},
        {"width": 0},
        {"width": -0.5},
        {"width": math.nan},
        {"width": math.inf},
        {"width": "1"},
        {"dropout": 0.5},
    ],
)
def test_bad_arguments_raise_user_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UserError):
        create_model("lenet5", **kwargs)


def test_non_string_name_raises_user_error() -> None:
    with pytest.raises(UserError):
        create_model(3)  # type: ignore[arg-type]


def test_scaled() -> None:
    assert scaled(64, 1.0) == 64
    assert scaled(64, 0.5) == 32
    assert scaled(6, 0.125) == 1  # round(0.75)
    assert scaled(64, 0.001) == 1  # never zero channels


def test_register_model() -> None:
    @register_model("tmp_test_net")
    def tmp_test_net(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "tmp_test_net" in list_models()
        assert isinstance(create_model("tmp_test_net", num_classes=2), nn.Sequential)

        def other(**_: object) -> nn.Module:
            return nn.Identity()

        with pytest.raises(ValueError, match="already registered"):
            register_model("tmp_test_net")(other)
    finally:
        registry._REGISTRY.pop("tmp_test_net", None)
    assert "tmp_test_net" not in list_models()


def test_lenet_keeps_spatial_flatten() -> None:
    model = create_model("lenet5", in_channels=1)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == 5
    assert model.classifier.fc1.in_features == model.features.conv2.out_channels * 25


def test_mobilenet_has_depthwise_convs() -> None:
    for width in (1.0, 0.3, 0.125):
        model = create_model("mobilenet_v2", width=width)
        depthwise = [
            m
            for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1
        ]
        assert depthwise, width
        for conv in depthwise:
            assert conv.groups == conv.in_channels == conv.out_channels


def _functions(model: nn.Module) -> list[object]:
    graph = torch.fx.symbolic_trace(model).graph
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small"])
def test_residual_adds_in_graph(name: str) -> None:
    targets = _functions(build(name))
    assert any(t in (operator.add, torch.add) for t in targets)
    assert operator.iadd not in targets


def test_resnet_downsample_shortcut() -> None:
    model = build("resnet50")
    assert model.layer1[0].downsample is not None  # 64 -> 256 channels
    assert model.layer1[1].downsample is None
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer4[-1].conv3.out_channels == scaled(512, DEFAULT_TEST_WIDTH) * 4


def test_googlenet_concatenates_branches() -> None:
    targets = _functions(build("googlenet"))
    assert targets.count(torch.cat) == 9  # one per Inception module
