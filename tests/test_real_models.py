"""timm and torchvision CNNs as users have them: cut exactly, or refused by name (skipped where neither installs)."""
from __future__ import annotations

import pytest
import torch
import vision_models

import modellego
from modellego.core.graph import trace
from modellego.core.locate import keep_channels
from modellego.cut.disassemble import masked_forward
from modellego.errors import UnsupportedGraphError

timm = vision_models.load("timm")
torchvision = vision_models.load("torchvision")
pytestmark = [pytest.mark.skipif(timm is None or torchvision is None, reason="timm and torchvision are not installed"),
              pytest.mark.filterwarnings("ignore:no class uses channel space"),
              pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")]

# At least 20 architectures of both libraries at small inputs, one of each family the library follows:
# residual, grouped (ResNeXt, RegNet), depthwise with squeeze-and-excitation (EfficientNet, MobileNet,
# MnasNet, LCNet), ghost modules and partial residuals (slices), CSP splits, channel shuffles,
# LayerNorm over channels with a layer scale (ConvNeXt), RepVGG, inception and fire modules.
# The heaviest of benchmarks/real_models.py (ResNet-50, DenseNet, VGG, AlexNet, Inception-v3) stay there.
EXACT = [("timm", n) for n in ("resnet18", "resnext26ts", "regnetx_002", "efficientnet_b0", "mobilenetv2_100",
                               "mobilenetv3_small_100", "mnasnet_100", "ghostnet_100", "convnext_atto", "repvgg_a0",
                               "rexnet_100", "lcnet_050", "tinynet_e", "cspresnet50")]
EXACT += [("torchvision", n) for n in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                       "squeezenet1_1", "shufflenet_v2_x0_5", "googlenet", "mnasnet0_5",
                                       "regnet_x_400mf")]
# ConvNeXt's blocks without conv_mlp run channels-last (permute, LayerNorm and Linear over the last axis).
REFUSED = [("timm", "convnext_atto", {"conv_mlp": False}, "'permute'")]


def build(library: str, name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "timm":
        return timm.create_model(name, num_classes=10, pretrained=False, **kwargs).eval()
    return getattr(torchvision.models, name)(num_classes=10).eval()


@pytest.mark.parametrize("library,name", EXACT, ids=[f"{a}-{b}" for a, b in EXACT])
def test_real_architectures_are_cut_exactly_and_their_files_load_by_name(library: str, name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = modellego.create_model(f"{library}:{name}", num_classes=10).eval().double()
    x, y = torch.randn(12, 3, 32, 32, dtype=torch.float64), torch.arange(12) % 10
    prof = modellego.profile(model, [(x, y)], select=False)
    component = modellego.disassemble(model, [0, 1, 2], profile=prof)  # the built-in relative check passes
    assert sum(p.numel() for p in component.parameters()) < sum(p.numel() for p in model.parameters())
    # And by hand, on other inputs, at float64 precision relative to the logits' scale.
    graph = trace(model, x[:1])
    keep = keep_channels(graph, prof.task_in_masks([0, 1, 2]), [0, 1, 2], warn=False)
    other = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = component(other), masked_forward(model, graph, keep, other)[:, [0, 1, 2]]
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
    # The file records the library's name: loading rebuilds the architecture, replays the cut, same outputs.
    component = component.float()
    loaded = modellego.load(modellego.save(component, tmp_path / "c"))
    assert type(loaded) is type(model) and modellego.get_info(loaded).arch == f"{library}:{name}"
    with torch.no_grad():
        assert torch.equal(loaded(other.float()), component(other.float()))


@pytest.mark.parametrize("library,name,kwargs,op", REFUSED, ids=[f"{a}-{b}" for a, b, _, _ in REFUSED])
def test_what_is_not_understood_is_refused_by_name(library: str, name: str, kwargs: dict, op: str) -> None:
    model = build(library, name, **kwargs)
    x, y = torch.randn(4, 3, 48, 48), torch.arange(4)
    with pytest.raises(UnsupportedGraphError, match=op) as info:
        modellego.profile(model, [(x, y)], select=False)
    assert "cannot follow channels through node" in str(info.value)


@pytest.mark.parametrize("library,name", [("timm", "mobilenetv3_small_100"), ("torchvision", "efficientnet_b0")])
def test_components_of_library_models_save_and_load_into_a_fresh_instance(library: str, name: str, tmp_path) -> None:
    model = build(library, name)
    x, y = torch.randn(12, 3, 48, 48), torch.arange(12) % 10
    component = modellego.disassemble(model, [3, 1], batches=[(x, y)], select=False, calibrate="none")
    path = modellego.save(component, tmp_path / "c")
    fresh = build(library, name)
    with torch.no_grad():  # other weights: every tensor must come from the file
        for p in fresh.parameters():
            p.add_(1.0)
    loaded = modellego.load(path, model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), component(x))
    assert type(loaded) is type(model) and modellego.get_info(loaded) == modellego.get_info(component)
