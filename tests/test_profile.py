"""The Profile file: bit-identical round trips, stored contributions, clear errors for bad files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, locate_class
from modellego.core.profile import Profile
from modellego.errors import CorruptFileError

from helpers import assert_same_model
from helpers import file_data as data
from helpers import file_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


# --- Round trips ---------------------------------------------------------------------------------


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


def test_stored_contributions_relocate_to_the_stored_masks(resnet, tmp_path) -> None:
    model, x, prof = resnet
    back = Profile.load(prof.save(tmp_path / "p.safetensors"))
    assert back.contributions.keys() == prof.contributions.keys()
    assert all(torch.equal(back.contributions[k], prof.contributions[k]) for k in prof.contributions)
    graph = trace(model, x[:1])
    for row, c in enumerate(back.classes):
        ins, outs = locate_class(graph, {k: v[row] for k, v in back.contributions.items()}, c, back.thresholds)
        assert all(torch.equal(ins[k], back.in_masks[k][row]) for k in ins)
        assert all(torch.equal(outs[k], back.out_masks[k][row]) for k in outs)


# --- Bad files -------------------------------------------------------------------------------------


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


def test_malformed_stored_contributions_are_refused(resnet, tmp_path) -> None:
    _, _, prof = resnet
    path = prof.save(tmp_path / "p.safetensors")
    tensors = load_file(str(path))
    layer = prof.layers[0]
    tensors[f"r/{layer}"] = tensors[f"r/{layer}"][:, :1].contiguous()  # wrong output count
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CorruptFileError, match=layer):
        Profile.load(bad)
