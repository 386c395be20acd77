"""ModelInfo: JSON round trips, in memory and through a file, and clear errors for malformed descriptions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import modellego
from modellego.errors import UserError
from modellego.io.info import InputSpec, ModelInfo, get_info, set_info

from helpers import file_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def test_model_info_round_trip() -> None:
    info = ModelInfo(
        arch="resnet18", arch_kwargs={"num_classes": 3, "in_channels": 1, "width": 0.5},
        class_names=("cat", "dog", "émeu"), classes=(7, 2, 9),
        input=InputSpec(1, (28, 32), (0.5,), (0.25,)), dataset="toy", kind="component",
        pruning={"conv1": {"out": [0, 2], "in": [0]}, "bn1": {"out": [0, 2]}},
        provenance={"task": [7, 2, 9], "nested": {"a": [1.5, None, "x"]}},
    )
    again = ModelInfo.from_json(json.loads(json.dumps(info.to_json())))
    assert again == info
    assert again.input.size == (28, 32) and again.num_classes == 3
    minimal = ModelInfo(arch=None, arch_kwargs={}, class_names=("a",), classes=(0,))
    assert ModelInfo.from_json(json.loads(json.dumps(minimal.to_json()))) == minimal


def test_model_info_round_trips_through_a_file(tmp_path: Path) -> None:
    model = build("lenet5")
    info = get_info(model).replace(class_names=tuple("abcde"), dataset="toy",
                                   input=InputSpec(3, (28, 28), (0.1, 0.2, 0.3), (1.0, 2.0, 3.0)),
                                   provenance={"epochs": 3})
    set_info(model, info)
    assert get_info(modellego.load(modellego.save(model, tmp_path / "m.safetensors"))) == info


@pytest.mark.parametrize("bad", [{}, {"arch": "x"}, {"arch": "x", "arch_kwargs": {}, "class_names": ["a"], "classes": ["z"]},
                                 {"arch": "x", "arch_kwargs": {}, "class_names": ["a", "b"], "classes": [0]}])
def test_malformed_model_info_raises_user_error(bad: dict) -> None:
    with pytest.raises(UserError):
        ModelInfo.from_json(bad)
