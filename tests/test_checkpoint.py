"""Model files as bytes (safetensors, the description in the header): clear errors for bad files, no pickle."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import modellego
from modellego.core.profile import Profile
from modellego.errors import CorruptFileError, UserError

from helpers import assert_same_model, rewrite_header
from helpers import file_data as data
from helpers import file_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


# --- Bad files -------------------------------------------------------------------------------------


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


# --- No pickle -------------------------------------------------------------------------------------


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
