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


def test_a_write_sweeps_stale_temporaries_of_its_destination(tmp_path: Path) -> None:
    """A killed process leaves its temporary behind; the next write to that file removes it once it is old."""
    import os

    from modellego.io.atomic import STALE_AFTER_S

    stale = tmp_path / ".m.safetensors.abc_1234.tmp"  # the name atomic_path would have given it
    young = tmp_path / ".m.safetensors.zzzz9999.tmp"  # perhaps a write still under way
    others = [tmp_path / ".m.safetensors.backup.tmp", tmp_path / ".n.safetensors.abcd1234.tmp",
              tmp_path / "m.safetensors.abcd1234.tmp"]
    for p in [stale, young, *others]:
        p.write_bytes(b"half a file")
    old = os.stat(stale).st_mtime - STALE_AFTER_S - 1
    for p in [stale, *others]:
        os.utime(p, (old, old))
    model = build("lenet5")
    path = modellego.save(model, tmp_path / "m.safetensors")
    no_files_but(tmp_path, "m.safetensors", "m.json", young.name, *(p.name for p in others))
    assert_same_model(model, modellego.load(path))


def test_a_failed_write_removes_its_temporary_whatever_it_raises(tmp_path: Path) -> None:
    from modellego.io.atomic import atomic_path

    for error in (OSError("disk full"), KeyboardInterrupt(), ValueError("bad")):
        with pytest.raises(type(error)), atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise error
        no_files_but(tmp_path)


def test_a_failed_readable_copy_leaves_the_model_saved_and_no_stale_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = modellego.save(build("lenet5", seed=0), tmp_path / "m.safetensors")  # m.json describes seed 0

    def failing_write_json(p, obj):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_json", failing_write_json)
    new = build("lenet5", seed=1)
    with caplog.at_level("WARNING", logger="modellego.io.checkpoint"):
        modellego.save(new, path)
    assert "not its readable copy" in caplog.text
    no_files_but(tmp_path, "m.safetensors")  # the old m.json would describe the old model
    assert_same_model(new, modellego.load(path))
