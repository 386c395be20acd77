"""save, load and build: bit-identical round trips, each module rebuilt from its stored description alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import modellego
import modellego.io.checkpoint as checkpoint
from modellego.errors import CorruptFileError
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
