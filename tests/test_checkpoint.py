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
    msg = str(info.value).removeprefix(f"{saved}: ")  # the test's folder name says "truncated" too
    assert "truncated" in msg or "readable" in msg


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
    with pytest.raises(CorruptFileError, match="was written by a newer modellego"):
        modellego.load(saved)
    rewrite_header(saved, lambda h: h.update(format_version="one"))
    with pytest.raises(CorruptFileError, match="format_version 'one' is not an integer"):
        modellego.load(saved)


def test_malformed_description_in_a_file_is_corrupt(saved: Path) -> None:
    rewrite_header(saved, lambda h: h["model"].pop("classes"))
    with pytest.raises(CorruptFileError, match="malformed model description: model.classes is missing"):
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


# --- The description: its hash, its schema, and whether it fits the tensors ------------------------


def _edited(path: Path, edit, *, rehash: bool = True) -> str:
    """The one-line error of loading `path` after `edit` of its header."""
    rewrite_header(path, edit, rehash=rehash)
    with pytest.raises(CorruptFileError) as info:
        modellego.load(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) <= 300 + len(str(path)) + 2, msg
    return msg.removeprefix(f"{path}: ")


@pytest.mark.parametrize("edit", [
    lambda m: m.update(classes=m["classes"][::-1]),
    lambda m: m["input"]["mean"].__setitem__(0, 0.5),
    lambda m: m["provenance"].update(epochs=99),
    lambda m: m["arch_kwargs"].update(width=0.5),
])
def test_an_edited_description_fails_its_hash(saved: Path, edit) -> None:
    rewrite_header(saved, lambda h: h["model"].update(input={"channels": 3, "size": [28, 28], "mean": [0.1] * 3,
                                                             "std": [0.3] * 3}))
    modellego.load(saved)  # re-hashed: a valid file
    assert _edited(saved, lambda h: edit(h["model"]), rehash=False) == \
        "the description does not match its hash: the file was edited or damaged"


def _assembly(density: bool = False):
    """A padded assembly of two lenet5 components (classes 0-1 and 2-3), with a density head if asked."""
    model = build("lenet5")
    modellego.io.info.set_info(model, modellego.get_info(model).replace(
        input=modellego.InputSpec(3, (28, 28), (0.1,) * 3, (0.3,) * 3)))
    prof = modellego.profile(model, data(), select=False)
    asm = modellego.assemble([modellego.disassemble(model, c, profile=prof) for c in ([0, 1], [2, 3])])
    if density:
        g = torch.Generator().manual_seed(0)
        modellego.scale_assembly(asm, [(torch.randn(30, 3, 28, 28, generator=g), torch.arange(30) % 4)],
                                 method="density")
    return asm


def test_an_edited_label_map_fails_its_hash(tmp_path: Path) -> None:
    path = modellego.save(_assembly(), tmp_path / "a.safetensors")

    def rename(h):
        h["model"]["assembly"]["label_map"][0]["name"] = "cat"

    assert "does not match its hash" in _edited(path, rename, rehash=False)
    rewrite_header(path, rename)  # consistent again: the label map may name its classes
    assert modellego.get_info(modellego.load(path)).assembly.label_map[0].name == "cat"
    msg = _edited(path, lambda h: h["model"]["assembly"]["label_map"].reverse())
    assert "model.assembly.label_map[0] does not list the components' classes in order" in msg


def test_a_version_1_assembly_keeps_its_label_map_in_the_provenance(tmp_path: Path) -> None:
    asm = _assembly()
    path = modellego.save(asm, tmp_path / "a.safetensors")

    def version_1(h):
        del h["header_sha256"]
        h["format_version"] = 1
        h["model"]["provenance"]["label_map"] = h["model"]["assembly"].pop("label_map")

    rewrite_header(path, version_1)
    loaded = modellego.load(path)
    assert modellego.get_info(loaded).assembly == modellego.get_info(asm).assembly
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), asm(x))


def test_version_2_files_load_without_the_header_check(saved: Path) -> None:
    original = modellego.load(saved)

    def legacy(h):
        del h["header_sha256"]
        h["format_version"] = 2

    rewrite_header(saved, legacy)
    assert_same_model(original, modellego.load(saved))
    rewrite_header(saved, lambda h: h["model"]["provenance"].update(note="edited"))  # nothing to catch it
    assert modellego.get_info(modellego.load(saved)).provenance["note"] == "edited"
    rewrite_header(saved, lambda h: h.update(format_version=3))  # a version 3 file must carry its hash
    with pytest.raises(CorruptFileError, match="does not match its hash"):
        modellego.load(saved)


@pytest.mark.parametrize(("edit", "where"), [
    (lambda h: h.update(model=None), "model: expected an object, got null"),
    (lambda h: h["model"]["arch_kwargs"].update(num_classes="5"), "model.arch_kwargs.num_classes: expected an integer"),
    (lambda h: h["model"]["arch_kwargs"].update(width=1e308), "model.arch_kwargs.width: expected a number in (0, 64]"),
    (lambda h: h["model"]["arch_kwargs"].update(width=1000), "model.arch_kwargs.width"),
    (lambda h: h["model"]["arch_kwargs"].update(num_classes=10**12), "model.arch_kwargs.num_classes"),
    (lambda h: h["model"]["arch_kwargs"].update(in_channels=-3), "model.arch_kwargs.in_channels"),
    (lambda h: h["model"].update(classes=[0, 1, 2, 3, -4]), "model.classes[4]: expected an integer"),
    (lambda h: h["model"].update(input={"channels": 3, "size": [28, "28"], "mean": [0] * 3, "std": [1] * 3}),
     "model.input.size[1]: expected an integer"),
    (lambda h: h["model"].update(input={"channels": 3, "size": [28, 28], "mean": [0] * 3, "std": [1, 0, 1]}),
     "model.input.std[1]: expected a finite number > 0"),
    (lambda h: h["model"].update(pruning={"features.conv1": {"out": [0, -1]}}), "model.pruning['features.conv1'].out[1]"),
    (lambda h: h["model"].update(kind="virus"), "model.kind"),
    (lambda h: h["model"].update(provenance=[]), "model.provenance: expected an object"),
    (lambda h: h.update(weights_sha256=None), "weights_sha256"),
])
def test_a_malformed_description_names_the_field(saved: Path, edit, where: str) -> None:
    msg = _edited(saved, edit)
    assert where in msg


def test_huge_numbers_and_deep_nesting_are_refused_before_parsing(saved: Path) -> None:
    with safetensors.safe_open(str(saved), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = f.metadata()["modellego"]
    for bad, match in [(text.replace('"num_classes": 5', '"num_classes": ' + "9" * 5000), "not valid JSON"),
                       (text.replace('"provenance": {}', '"provenance": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                        "nested 100003 deep, more than the 64 allowed")]:
        assert bad != text
        save_file(tensors, str(saved), metadata={"modellego": bad})
        with pytest.raises(CorruptFileError, match=match):
            modellego.load(saved)


def test_an_oversized_header_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="more than the 16777216 this library reads"):
        modellego.load(path)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m.update(input={"channels": 1, "size": [28, 28], "mean": [0.0], "std": [1.0]}),
     "1 input channels, but the first layer 'features.conv1' reads 3"),
    (lambda m: m["arch_kwargs"].update(num_classes=6), "5 classes, but the classifier 'classifier.fc3' has 6 outputs"),
    (lambda m: m["arch_kwargs"].update(width=8.0), "tensor 'features.conv1.weight' has shape [2, 3, 5, 5], "
                                                   "the description builds [48, 3, 5, 5]"),
    (lambda m: m.update(arch="lenet6"), "unknown model 'lenet6'"),
    (lambda m: m.update(pruning={"features.conv9": {"out": [0]}}), "names layer 'features.conv9'"),
])
def test_a_description_that_does_not_fit_its_tensors_is_refused(saved: Path, edit, match: str) -> None:
    assert match in _edited(saved, lambda h: edit(h["model"]))


def test_an_assembly_description_must_fit_its_body(tmp_path: Path) -> None:
    path = modellego.save(_assembly(density=True), tmp_path / "a.safetensors")
    raw = path.read_bytes()

    def spec(edit):
        return lambda h: edit(h["model"]["assembly"])

    for edit, match in [
        (lambda s: s.update(components=[]), "model.assembly.components: expected a non-empty list"),
        (lambda s: s["density"][0].update(layer="classifier.fc9"), "names layer 'classifier.fc9', which is not"),
        (lambda s: s["layer_sizes"]["features.conv1"].update(out=-2), "layer_sizes['features.conv1'].out"),
        (lambda s: s["layer_sizes"]["features.conv1"].update(out=3), "tensor 'body.features.conv1.weight' has shape"),
        (lambda s: s["density"][0].update(features=10**6), "density[0]: 1000000 features of a layer of 3 inputs"),
        (lambda s: s["density"][0].update(features=2), "tensor 'probe.positions_0' has shape [3], the description builds [2]"),
        (lambda s: s.update(mode="stacked"), "model.assembly.mode"),
    ]:
        path.write_bytes(raw)
        assert match in _edited(path, spec(edit))


def test_a_fifo_or_folder_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CorruptFileError, match="not a regular file"):
        modellego.load(fifo)  # would block forever if opened
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorruptFileError, match="not a regular file"):
        Profile.load(tmp_path / "folder")
    with pytest.raises(UserError, match="no model file"):  # a folder means the model file inside it
        modellego.load(tmp_path / "folder")


def test_the_readable_copy_is_written_after_the_model_and_never_read(tmp_path: Path, monkeypatch) -> None:
    import modellego.io.checkpoint as checkpoint

    path = tmp_path / "m.safetensors"
    order = []
    real = checkpoint.write_json

    def write_json(p, obj):
        order.append(("json", path.exists()))
        real(p, obj)

    monkeypatch.setattr(checkpoint, "write_json", write_json)
    model = build("lenet5")
    modellego.save(model, path)
    assert order == [("json", True)]  # the model file was in place first
    sidecar = path.with_suffix(".json")
    assert json.loads(sidecar.read_text())["model"] == modellego.get_info(model).to_json()
    sidecar.write_text("{not json")  # a damaged or stale copy changes nothing
    assert_same_model(model, modellego.load(path))
    sidecar.unlink()
    assert_same_model(model, modellego.load(path))


def test_json_depth_skips_strings_in_one_pass() -> None:
    from modellego.io.checkpoint import json_depth

    assert json_depth(json.dumps({"a": "[[[{", "b": [['"]]', "\\"], {}]})) == 3  # the object, "b", its first item
    assert json_depth("[" * 1000 + "]" * 1000) == 1000
    assert json_depth('"' + '\\"' * 1_000_000 + "\\") == 0  # an unterminated string of escaped quotes: linear
