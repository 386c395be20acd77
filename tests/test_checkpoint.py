"""Model and profile files: bit-identical round trips, clear errors for bad files, no pickle."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from safetensors.torch import save_file

import modellego
import modellego.core.profile as profile_file
import modellego.io.checkpoint as checkpoint
from modellego.core.locate import Thresholds
from modellego.core.profile import Profile
from modellego.errors import CorruptFileError, UserError
from modellego.io.info import InputSpec, ModelInfo, get_info, set_info, weights_hash

SHAPE = (3, 28, 28)
TINY_WIDTH = {"lenet5": 0.25, "alexnet": 0.125, "mobilenet_v2": 0.125, "mobilenet_v3_small": 0.125}
pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def build(name: str, seed: int = 0, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    model = modellego.create_model(name, num_classes=num_classes, in_channels=3, width=TINY_WIDTH.get(name, 0.0625))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-default buffers and affine parameters, so they must round-trip too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)
    return model.eval()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def data(n: int = 15) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 5)]


def no_files_but(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# --- Round trips ---------------------------------------------------------------------------------


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


# --- Bad files -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return modellego.save(build("lenet5"), tmp_path / "m.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99, 20 / 10_000])
def test_truncated_file_raises_corrupt_file_error(saved: Path, keep: float) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw[: max(1, int(len(raw) * keep))])
    with pytest.raises(CorruptFileError, match="m.safetensors") as info:
        modellego.load(saved)
    assert isinstance(info.value, UserError)
    assert "truncated" in str(info.value) or "readable" in str(info.value)


def test_random_bytes_raise_corrupt_file_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptFileError, match="noise.safetensors"):
        modellego.load(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptFileError):
        modellego.load(path)


def test_plain_safetensors_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    with pytest.raises(CorruptFileError, match="not a modellego model"):
        modellego.load(path)
    save_file({"w": torch.ones(3)}, str(path), metadata={"modellego": "{not json"})
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        modellego.load(path)
    save_file({"w": torch.ones(3)}, str(path), metadata={"modellego": json.dumps({"format": "other"})})
    with pytest.raises(CorruptFileError, match="not a modellego model description"):
        modellego.load(path)


def rewrite_header(path: Path, edit) -> None:
    """Re-save `path` with the same tensors and an edited modellego header (weights hash still valid)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["modellego"])
    edit(header)
    save_file(tensors, str(path), metadata={"modellego": json.dumps(header)})


def test_newer_format_is_refused(saved: Path) -> None:
    rewrite_header(saved, lambda h: h.update(format_version=99))
    with pytest.raises(CorruptFileError, match="newer"):
        modellego.load(saved)
    rewrite_header(saved, lambda h: h.update(format_version="one"))
    with pytest.raises(CorruptFileError, match="format_version"):
        modellego.load(saved)


def test_malformed_description_in_a_file_is_corrupt(saved: Path) -> None:
    rewrite_header(saved, lambda h: h["model"].pop("classes"))
    with pytest.raises(CorruptFileError, match="malformed"):
        modellego.load(saved)


@pytest.mark.parametrize("plan", [{"no.such.layer": {"out": [0]}}, {"features.conv1": {"out": [0, 99]}}])
def test_pruning_plan_that_does_not_fit_is_corrupt(saved: Path, plan: dict) -> None:
    rewrite_header(saved, lambda h: h["model"].update(pruning=plan))
    with pytest.raises(CorruptFileError, match="m.safetensors"):
        modellego.load(saved)


def test_modified_weights_fail_the_hash(saved: Path) -> None:
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's data, after the header
    saved.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="hash"):
        modellego.load(saved)


def test_swapped_tensors_fail_the_hash(saved: Path) -> None:
    """Re-saving different weights under the original header is detected too."""
    with safetensors.safe_open(str(saved), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["classifier.fc3.bias"] = tensors["classifier.fc3.bias"] + 1
    save_file(tensors, str(saved), metadata=meta)
    with pytest.raises(CorruptFileError, match="hash"):
        modellego.load(saved)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no model file"):
        modellego.load(tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="no profile"):
        Profile.load(tmp_path / "absent.profile")


# --- No pickle, atomic writes -----------------------------------------------------------------------


def test_no_pickle_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle / torch.load must not be used")

    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    model = build("resnet18")
    prof = modellego.profile(model, data(), select=False)
    component = modellego.disassemble(model, [1, 0], profile=prof)
    assert_same_model(component, modellego.load(modellego.save(component, tmp_path / "c")))
    prof.save(tmp_path / "p.profile")
    assert Profile.load(tmp_path / "p.profile").classes == prof.classes


def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")  # something was written before the failure
    raise OSError("disk full")


def test_interrupted_model_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    monkeypatch.setattr(checkpoint, "save_file", _failing_save_file)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OSError, match="disk full"):
        modellego.save(build("lenet5"), folder / "m.safetensors")
    no_files_but(folder)


def test_interrupted_overwrite_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = build("lenet5", seed=0)
    path = modellego.save(old, tmp_path / "m.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        modellego.save(build("lenet5", seed=1), path)
    no_files_but(tmp_path, "m.safetensors", "m.json")
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert_same_model(old, modellego.load(path))


def test_interrupted_profile_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prof = modellego.profile(build("lenet5"), data(), select=False)
    monkeypatch.setattr(profile_file, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        prof.save(tmp_path / "p.profile")
    no_files_but(tmp_path)


# --- Profiles -------------------------------------------------------------------------------------


def test_profile_round_trip(tmp_path: Path) -> None:
    model = build("googlenet")
    th = Thresholds(conv_alpha=0.5, conv_beta=0.25, linear_alpha=0.6, linear_beta=0.35)
    prof = modellego.profile(model, data(), classes=[4, 0, 2], thresholds=th, select=False, mode="mean")
    path = prof.save(tmp_path / "g.profile")
    loaded = Profile.load(path)
    assert loaded.classes == (4, 0, 2) and loaded.class_names == ("4", "0", "2")
    assert loaded.thresholds == th
    assert loaded.provenance == prof.provenance and loaded.provenance["mode"] == "mean"
    assert loaded.layers == prof.layers
    for k in prof.layers:
        assert loaded.in_masks[k].dtype == torch.bool
        assert torch.equal(loaded.in_masks[k], prof.in_masks[k])
        assert torch.equal(loaded.out_masks[k], prof.out_masks[k])
    # the loaded profile disassembles exactly like the original
    a = modellego.disassemble(model, [2, 4], profile=prof)
    b = modellego.disassemble(model, [2, 4], profile=loaded)
    assert_same_model(a, b)


@pytest.fixture
def saved_profile(tmp_path: Path) -> Path:
    return modellego.profile(build("lenet5"), data(), select=False).save(tmp_path / "p.profile")


@pytest.mark.parametrize("keep", [0.5, 0.97, 0.002])
def test_truncated_profile_raises(saved_profile: Path, keep: float) -> None:
    raw = saved_profile.read_bytes()
    saved_profile.write_bytes(raw[: max(1, int(len(raw) * keep))])
    with pytest.raises(CorruptFileError, match="p.profile"):
        Profile.load(saved_profile)


def test_random_bytes_profile_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.profile"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CorruptFileError):
        Profile.load(path)


def test_model_file_is_not_a_profile(saved: Path) -> None:
    with pytest.raises(CorruptFileError, match="not a modellego profile"):
        Profile.load(saved)


def test_malformed_profile_header_raises(saved_profile: Path) -> None:
    with safetensors.safe_open(str(saved_profile), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["modellego-profile"])
    header["layers"].append("no.such.layer")
    save_file(tensors, str(saved_profile), metadata={"modellego-profile": json.dumps(header)})
    with pytest.raises(CorruptFileError, match="malformed"):
        Profile.load(saved_profile)
    header["layers"].pop()
    header["classes"] = header["classes"][:-1]  # mask rows no longer match the class count
    save_file(tensors, str(saved_profile), metadata={"modellego-profile": json.dumps(header)})
    with pytest.raises(CorruptFileError, match="malformed"):
        Profile.load(saved_profile)
    save_file(tensors, str(saved_profile), metadata={"modellego-profile": "[oops"})
    with pytest.raises(CorruptFileError):
        Profile.load(saved_profile)
