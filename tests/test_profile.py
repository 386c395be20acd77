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
from modellego.errors import CorruptFileError, UserError

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
    raw = saved_profile.read_bytes()
    _resave(saved_profile, lambda h: h["layers"].append("no.such.layer"))  # hashes recomputed: the edit is met
    with pytest.raises(CorruptFileError, match="malformed profile: the tensors are not the masks of its layers"):
        Profile.load(saved_profile)
    saved_profile.write_bytes(raw)
    _resave(saved_profile, lambda h: h.update(classes=h["classes"][:-1], class_names=h["class_names"][:-1]))
    with pytest.raises(CorruptFileError, match=r"malformed profile: mask .* expected U8 of shape \[4, width\]"):
        Profile.load(saved_profile)  # mask rows no longer match the class count
    with safetensors.safe_open(str(saved_profile), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(saved_profile), metadata={"modellego-profile": "[oops"})
    with pytest.raises(CorruptFileError, match="not valid JSON"):
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


# --- Hashes, versions and the checks of the masks ------------------------------------------------------


def _resave(path: Path, edit_header=None, edit_tensors=None, *, rehash: bool = True) -> None:
    """Re-save a profile with an edited header and/or tensors; with `rehash`, its hashes made to fit."""
    from modellego.io.checkpoint import HEADER_HASH, header_hash
    from modellego.io.info import weights_hash

    tensors = load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["modellego-profile"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if rehash and HEADER_HASH in header:
        header["tensors_sha256"] = weights_hash(tensors)
        header[HEADER_HASH] = header_hash(header)
    save_file(tensors, str(path), metadata={"modellego-profile": json.dumps(header)})


def test_an_edited_profile_fails_its_hashes(saved_profile: Path) -> None:
    raw = saved_profile.read_bytes()
    _resave(saved_profile, lambda h: h["thresholds"].update(conv_alpha=0.9), rehash=False)
    with pytest.raises(CorruptFileError, match="the description does not match its hash: the file was edited or damaged"):
        Profile.load(saved_profile)
    saved_profile.write_bytes(raw)
    layer = Profile.load(saved_profile).layers[0]
    _resave(saved_profile, edit_tensors=lambda t: t[f"in/{layer}"].__setitem__((0, 0), 1 - t[f"in/{layer}"][0, 0]),
            rehash=False)
    with pytest.raises(CorruptFileError, match="the tensors do not match their recorded hash"):
        Profile.load(saved_profile)


def test_a_version_1_profile_loads_without_hashes(saved_profile: Path) -> None:
    want = Profile.load(saved_profile)

    def legacy(h):
        del h["header_sha256"], h["tensors_sha256"]
        h["format_version"] = 1

    _resave(saved_profile, legacy)
    got = Profile.load(saved_profile)
    assert got.classes == want.classes and got.provenance == want.provenance
    assert all(torch.equal(got.in_masks[k], want.in_masks[k]) for k in want.layers)
    _resave(saved_profile, lambda h: h.update(format_version=3))
    with pytest.raises(CorruptFileError, match="newer modellego"):
        Profile.load(saved_profile)


@pytest.mark.parametrize(("edit_header", "edit_tensors", "match"), [
    (lambda h: h["provenance"].update(input_shape=[3, 28]), None, "provenance.input_shape is not a list of 3"),
    (lambda h: h["provenance"].update(input_shape=[3, 0, 28]), None, "provenance.input_shape"),
    (lambda h: h.update(layers=[]), None, "layers is not a non-empty list"),
    (lambda h: h.update(provenance=None), None, "provenance is not an object"),
    (lambda h: h.update(classes=[0, 1, 2, 3, 3]), None, "classes repeat"),
    (lambda h: h["thresholds"].update(conv_alpha="high"), None, "threshold conv_alpha is not a number"),
    (lambda h: h["thresholds"].update(conv_alpha=2.0), None, "threshold conv_alpha must be in (0, 1]"),
    (None, lambda t: t.update({"in/features.conv1": t["in/features.conv1"] * 2}), "holds values other than 0 and 1"),
    (None, lambda t: t.update({"in/features.conv1": t["in/features.conv1"][:3].contiguous()}),
     "mask 'in/features.conv1' is U8 [3, 3], expected U8 of shape [5, width]"),
    (None, lambda t: t.update({"in/features.conv1": t["in/features.conv1"].float()}), "mask 'in/features.conv1' is F32"),
    (None, lambda t: t.pop("out/features.conv2"), "the tensors are not the masks of its layers"),
    (None, lambda t: t.update(extra=torch.zeros(1)), "the tensors are not the masks of its layers"),
])
def test_a_malformed_profile_names_what_is_wrong(saved_profile: Path, edit_header, edit_tensors, match: str) -> None:
    _resave(saved_profile, edit_header, edit_tensors)
    with pytest.raises(CorruptFileError) as info:
        Profile.load(saved_profile)
    msg = str(info.value)
    assert match in msg and "\n" not in msg, msg


def test_check_graph_compares_the_masks_with_a_model(saved_profile: Path) -> None:
    prof = Profile.load(saved_profile)
    prof.check_graph(trace(build("lenet5"), torch.zeros(1, 3, 28, 28)))
    with pytest.raises(UserError, match="unknown profiled layer 'features.conv1'"):
        prof.check_graph(trace(build("resnet18"), torch.zeros(1, 3, 28, 28)))
    other = modellego.create_model("lenet5", num_classes=5, in_channels=3, width=0.5).eval()
    with pytest.raises(UserError, match=r"layer 'features.conv1' have \(inputs, outputs\) \(3, 2\), the model's layer \(3, 3\)"):
        prof.check_graph(trace(other, torch.zeros(1, 3, 28, 28)))
