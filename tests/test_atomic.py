"""Atomic writes: an interrupted write of a model or a profile leaves nothing, or the old file, behind."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch

import modellego
import modellego.core.profile as profile_file
import modellego.io.checkpoint as checkpoint

from helpers import assert_same_model, no_files_but
from helpers import file_data as data
from helpers import file_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


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
