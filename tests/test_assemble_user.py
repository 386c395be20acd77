"""Assembling components of the user's own modules (no zoo architecture, no recorded input): padded and
parallel assemblies equal their components side by side, and what cannot be padded says why."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import vision_models

import modellego
from modellego.assembly.assemble import assemble, can_pad, side_by_side
from modellego.errors import UserError
from modellego.io.info import InputSpec, get_info, set_info

from helpers import GroupedNet, Shuffle, randomise_bn

timm = vision_models.load("timm")
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")

SHAPE = (3, 20, 20)
CLASSES = 4


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallNet(nn.Module):
    """A user's CNN: a stem, residual blocks, a strided convolution, pooling and a classifier."""

    def __init__(self, blocks: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.down(self.blocks(self.stem(x)))), 1))


def images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cut(model: nn.Module, classes: list[int], seed: int) -> nn.Module:
    """A float64 component of `model` (no ModelInfo: a user module), the paper's cut."""
    model = randomise_bn(model.double().eval(), seed)
    x = images(seed=seed)
    prof = modellego.profile(model, [(x, torch.arange(len(x)) % CLASSES)], select=False)
    comp = modellego.disassemble(model, classes, profile=prof, calibrate="none")
    # The source records no input: the component's is read off the profile's images, unnormalised.
    assert get_info(comp).input == InputSpec(3, SHAPE[1:], (0.0,) * 3, (1.0,) * 3)
    return comp


def without_input(component: nn.Module) -> nn.Module:
    """As a component of an older file, or built by hand: no recorded input."""
    return set_info(component, get_info(component).replace(input=None))


def own(seed: int, classes: list[int], blocks: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return cut(SmallNet(blocks), classes, seed)


def timm_net(seed: int, classes: list[int]) -> nn.Module:
    torch.manual_seed(seed)
    return cut(timm.create_model("test_resnet", num_classes=CLASSES, pretrained=False), classes, seed)


def assert_side_by_side(asm: nn.Module, comps: list[nn.Module]) -> None:
    x = images(3, seed=9)
    with torch.no_grad():
        got = asm(x)
    want = side_by_side(comps, x, input_shape=SHAPE)
    assert got.shape == want.shape == (3, sum(get_info(c).num_classes for c in comps))
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


PAIRS = {"own": lambda: [own(1, [0, 2]), own(2, [1, 3])],
         "timm": lambda: [timm_net(1, [0, 2]), timm_net(2, [3, 1])],
         "own+timm": lambda: [own(1, [0, 2]), timm_net(2, [1, 3])]}


@pytest.mark.parametrize("pair,mode", [
    ("own", "padded"), ("own", "parallel"),
    pytest.param("timm", "padded", marks=needs_timm), pytest.param("own+timm", "parallel", marks=needs_timm)])
def test_assemblies_of_user_components_equal_them_side_by_side(pair: str, mode: str) -> None:
    comps = PAIRS[pair]()
    asm = assemble(comps, mode=mode)
    info = get_info(asm)
    assert asm.mode == mode and info.assembly.mode == mode
    # Their input came from their profile's images, unnormalised: the assembly reads what they read.
    assert all(c.input.channels == 3 and c.input.size == SHAPE[1:] and c.input.mean == (0.0,) * 3
               for c in info.assembly.components)
    if mode == "padded":
        assert asm.adapters is None  # one shared input, the first layers' filters stacked
        assert sum(p.numel() for p in asm.parameters()) > max(sum(p.numel() for p in c.parameters()) for c in comps)
    assert_side_by_side(asm, comps)


@needs_timm
def test_auto_mode_pads_one_class_and_names_why_not_otherwise() -> None:
    a, b = own(1, [0, 2]), own(2, [1, 3])
    assert can_pad([a, b], input_shape=SHAPE) is None and assemble([a, b], input_shape=SHAPE).mode == "padded"
    t = timm_net(2, [1, 3])
    reason = can_pad([a, t], input_shape=SHAPE)
    assert reason.startswith("architectures differ (") and "SmallNet" in reason and "timm.models.resnet.ResNet" in reason
    assert "None" not in reason
    mixed = assemble([a, t], input_shape=SHAPE)
    assert mixed.mode == "parallel"
    assert_side_by_side(mixed, [a, t])
    with pytest.raises(UserError, match="cannot pad these components: architectures differ"):
        assemble([a, t], mode="padded", input_shape=SHAPE)


def test_one_class_of_another_shape_is_assembled_in_parallel_and_says_where_it_differs() -> None:
    a, deeper = own(1, [0, 2]), own(2, [1, 3], blocks=2)
    reason = can_pad([a, deeper], input_shape=SHAPE)
    assert reason == "layer 'blocks.1.conv1' of component 1 is not in component 0"
    with pytest.raises(UserError, match=r"cannot pad these components: layer 'blocks.1.conv1'"):
        assemble([a, deeper], mode="padded", input_shape=SHAPE)
    asm = assemble([a, deeper], input_shape=SHAPE)
    assert asm.mode == "parallel"
    assert_side_by_side(asm, [a, deeper])


def test_the_input_of_user_components_must_be_given_and_fit() -> None:
    a, b = without_input(own(1, [0, 2])), without_input(own(2, [1, 3]))
    with pytest.raises(UserError, match=r"component 0 \(SmallNet\) has no input description: pass input_shape"):
        assemble([a, b])
    with pytest.raises(UserError, match="input_shape has 1 channels, but the first layer 'stem.0' of component 0"):
        assemble([a, b], input_shape=(1, 20, 20))
    with pytest.raises(UserError, match=r"input_shape must be \(C, H, W\) or \(H, W\)"):
        assemble([a, b], input_shape=(20,))
    # (H, W): the channels are the first layer's.
    assert_side_by_side(assemble([a, b], input_shape=SHAPE[1:]), [a, b])


def test_scaling_an_assembly_of_user_components() -> None:
    comps = [own(1, [0, 2]), own(2, [1, 3])]
    asm = assemble(comps, input_shape=SHAPE)
    x = images(40, seed=3)
    report = modellego.scale_assembly(asm, [(x, torch.arange(40) % 4)], "density")
    assert report is not None and asm.probe is not None
    with torch.no_grad():
        assert torch.isfinite(asm(x)).all()


@needs_timm
def test_a_padded_assembly_of_timm_components_built_by_name_saves_and_loads(tmp_path) -> None:
    comps = []
    for seed, classes in ((1, [0, 2]), (2, [1, 3])):
        torch.manual_seed(seed)
        comps.append(cut(modellego.create_model("timm:test_resnet", num_classes=CLASSES, in_channels=3), classes, seed))
        assert get_info(comps[-1]).arch == "timm:test_resnet"
    asm = assemble(comps, mode="padded", input_shape=SHAPE)
    assert_side_by_side(asm, comps)
    asm = asm.float()  # files hold what the module builds: float32
    loaded = modellego.load(modellego.save(asm, tmp_path / "asm"))  # rebuilt from the name: resized, then loaded
    assert get_info(loaded) == get_info(asm)
    x = images(3, seed=4).float()
    with torch.no_grad():
        assert torch.equal(loaded(x), asm(x))


@pytest.mark.parametrize("cls", [GroupedNet, Shuffle])
def test_components_padding_cannot_widen_are_assembled_in_parallel_with_the_reason(cls: type) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    channels = 1 if cls is GroupedNet else 3
    x = torch.randn(20, channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(20) % 5)], select=False)
    parts = [modellego.disassemble(model, task, profile=prof) for task in ([0, 1], [2, 3])]
    reason = can_pad(parts)
    assert reason is not None and ("grouped convolution" in reason or "keeps channels whole" in reason)
    asm = assemble(parts)  # auto: parallel, and exact
    assert get_info(asm).assembly.mode == "parallel"
    with torch.no_grad():
        got, want = asm(x), side_by_side(parts, x)
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
