"""save, load and build: bit-identical round trips, each module rebuilt from its stored description alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import modellego
import modellego.io.checkpoint as checkpoint
from modellego.errors import CorruptFileError, UserError
from modellego.io.info import get_info, weights_hash

from helpers import assert_same_model, no_files_but, rewrite_header
from helpers import file_data as data
from helpers import file_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


@pytest.mark.parametrize("name", modellego.list_models())
def test_zoo_model_round_trip_is_bit_identical(name: str, tmp_path: Path) -> None:
    model = build(name)
    path = modellego.save(model, tmp_path / "m")
    assert path == tmp_path / "m" / "model.safetensors"
    no_files_but(path.parent, "model.safetensors", "model.json")
    loaded = modellego.load(path)
    assert not loaded.training
    assert get_info(loaded) == get_info(model)
    assert_same_model(model, loaded)
    # the readable copy of the description is the header
    assert json.loads((path.parent / "model.json").read_text())["model"] == get_info(model).to_json()


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "googlenet", "mobilenet_v2", "mobilenet_v3_small"])
def test_component_round_trip_rebuilds_from_the_spec(name: str, tmp_path: Path) -> None:
    model = build(name)
    prof = modellego.profile(model, data(), select=False)
    component = modellego.disassemble(model, [4, 2], profile=prof)
    path = modellego.save(component, tmp_path / "c.safetensors")
    loaded = modellego.load(path)
    info = get_info(loaded)
    assert info == get_info(component) and info.kind == "component" and info.pruning
    shapes = {k: v.shape for k, v in component.state_dict().items()}
    assert {k: v.shape for k, v in loaded.state_dict().items()} == shapes
    assert shapes != {k: v.shape for k, v in model.state_dict().items()}  # really pruned
    assert_same_model(component, loaded)
    # Loading re-creates the zoo architecture and replays the plan: the header alone determines it.
    header = checkpoint.read_header(path)
    assert header["model"]["pruning"] == info.pruning
    assert header["weights_sha256"] == weights_hash(component.state_dict())


@pytest.mark.parametrize("plan", [{"no.such.layer": {"out": [0]}}, {"features.conv1": {"out": [0, 99]}}])
def test_pruning_plan_that_does_not_fit_is_corrupt(saved: Path, plan: dict) -> None:
    rewrite_header(saved, lambda h: h["model"].update(pruning=plan))
    with pytest.raises(CorruptFileError, match="m.safetensors"):
        modellego.load(saved)


class _OwnNet(nn.Module):
    """A residual CNN written outside the zoo (the zoo cannot rebuild it: its files need model=)."""

    def __init__(self, width: int = 8, classes: int = 4, kernel: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, kernel, padding=kernel // 2), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


def _own_component():
    from helpers import randomise_bn
    torch.manual_seed(0)
    net = randomise_bn(_OwnNet()).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 12, 12, generator=g), torch.arange(32) % 4
    comp = modellego.disassemble(net, [2, 0], batches=[(x, y)], select=False, calibrate="none")
    return net, comp, x


def test_a_component_of_a_module_outside_the_zoo_saves_and_loads_by_plan_replay(tmp_path) -> None:
    net, comp, x = _own_component()
    assert get_info(comp).arch is None and sum(p.numel() for p in comp.parameters()) < sum(p.numel() for p in net.parameters())
    path = modellego.save(comp, tmp_path / "own")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = _OwnNet()  # any weights: every tensor comes from the file
    loaded = modellego.load(path, model=fresh)
    assert type(loaded) is _OwnNet and get_info(loaded) == get_info(comp)
    with torch.no_grad():
        assert torch.equal(loaded(x), comp(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the source untouched
    assert fresh.stem[0].out_channels == 8  # the given module is copied, not pruned in place
    with pytest.raises(UserError, match=r"model=YourNet\(\)"):
        modellego.load(path)
    with pytest.raises(UserError, match="does not fit the given _OwnNet"):
        modellego.load(path, model=_OwnNet(width=6))  # the plan keeps channels the module does not have
    with pytest.raises(UserError, match=r"does not fit the given _OwnNet.*stem\.0\.weight"):
        modellego.load(path, model=_OwnNet(kernel=5))  # same plan, other tensor shapes
    with pytest.raises(UserError, match="does not fit the given Sequential.*'stem.0', which the model does not have"):
        modellego.load(path, model=nn.Sequential(nn.Conv2d(1, 8, 3)))  # other layer names
    assert torch.equal(modellego.load(path, model=_OwnNet(width=16))(x), comp(x))  # wider: the plan still fits
