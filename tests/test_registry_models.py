"""timm and torchvision architectures by name: built from the data, loaded with --weights, profiled and cut
from the command line, saved with their name and arguments, and rebuilt by `modellego.load(path)` alone
(skipped where neither installs)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import vision_models
from safetensors.torch import save_file

import modellego
from modellego.cli import main
from modellego.core.profile import Profile
from modellego.cut.disassemble import relative_error
from modellego.data import batches, load_dataset
from modellego.errors import CorruptFileError, UnknownNameError, UserError
from modellego.evaluation.protocol import model_transform
from modellego.files import load_weights, read_state_dict
from modellego.io.info import InputSpec, get_info, set_info
from modellego.models.registry import LibraryMissingError

from helpers import rewrite_header

timm = vision_models.load("timm")
torchvision = vision_models.load("torchvision")
pytestmark = [pytest.mark.skipif(timm is None or torchvision is None, reason="timm and torchvision are not installed"),
              pytest.mark.filterwarnings("ignore:no class uses channel space")]

SIDE, PER_CLASS = 16, 14


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of grey 16x16 images (horizontal gratings of 1, 2 and 3 periods), as .npy files."""
    root = tmp_path_factory.mktemp("folder")
    g = np.random.default_rng(0)
    rows = np.arange(SIDE)[:, None] / SIDE
    for k in range(3):
        (root / f"c{k}").mkdir()
        for i in range(PER_CLASS):
            img = 0.5 + 0.35 * np.sin(2 * np.pi * (k + 1) * rows + 0.3 * g.standard_normal()) \
                + 0.05 * g.standard_normal((SIDE, SIDE))
            np.save(root / f"c{k}" / f"{i}.npy", (np.clip(img, 0, 1) * 255).astype(np.uint8))
    return root


def data_args(folder: Path) -> list[str]:
    return ["--data", "imagefolder", "--data-dir", str(folder)]


@pytest.fixture(scope="module")
def weights(folder, tmp_path_factory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A timm resnet18 (3 classes, 1 channel) that classifies the folder's training images: random body,
    classifier fitted in closed form; its state dict as .safetensors and .pt."""
    ds = load_dataset("imagefolder", folder)
    torch.manual_seed(3)
    model = modellego.create_model("timm:resnet18", num_classes=3, in_channels=1).eval()
    set_info(model, get_info(model).replace(input=InputSpec(1, (SIDE, SIDE), ds.mean, ds.std)))
    x, y = next(iter(batches(ds.train, 512, transform=model_transform(model, ds))))
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True).double()  # (N, 512)
        a = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        target = 10 * (F.one_hot(y, 3).double() - 1 / 3)
        w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=f.dtype), a.T @ target)
        model.fc.weight.copy_(w[:-1].T)
        model.fc.bias.copy_(w[-1])
        assert bool((model(x).argmax(1) == y).all())  # profiling needs correct samples of every class
    d = tmp_path_factory.mktemp("weights")
    files = {"safetensors": d / "r18.safetensors", "pt": d / "r18.pt"}
    save_file(model.state_dict(), str(files["safetensors"]))
    torch.save(model.state_dict(), files["pt"])
    return model, files


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"modellego {argv[0]}: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def cut(folder, weights, tmp_path_factory) -> dict[str, Path]:
    """Profile and component files made by the command line from timm:resnet18 and the safetensors weights."""
    d = tmp_path_factory.mktemp("cut")
    out = {"profile": d / "r18.profile.safetensors", "component": d / "c02"}
    w = str(weights[1]["safetensors"])
    assert main(["profile", "timm:resnet18", "--weights", w, *data_args(folder), "-o", str(out["profile"])]) == 0
    assert main(["disassemble", "timm:resnet18", "--weights", w, *data_args(folder), "--classes", "c0,c2",
                 "--profile", str(out["profile"]), "--calibrate", "none", "-o", str(out["component"])]) == 0
    return out


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_cli_profiles_and_cuts_a_timm_model_that_loads_by_name(folder, weights, kind, tmp_path) -> None:
    source, files = weights
    prof, comp = tmp_path / "p.safetensors", tmp_path / "c"
    assert main(["profile", "timm:resnet18", "--weights", str(files[kind]), *data_args(folder), "-o", str(prof)]) == 0
    profile = Profile.load(prof)
    assert profile.model_sha256 == modellego.io.info.weights_hash(source.state_dict())  # the weights were loaded
    assert profile.provenance["input_shape"] == [1, SIDE, SIDE] and profile.class_names == ("c0", "c1", "c2")
    assert main(["disassemble", "timm:resnet18", "--weights", str(files[kind]), *data_args(folder),
                 "--classes", "0,2", "--profile", str(prof), "--calibrate", "none", "-o", str(comp)]) == 0
    loaded = modellego.load(comp)  # no model=: rebuilt from the recorded name and arguments
    info = get_info(loaded)
    assert type(loaded) is type(source) and info.kind == "component"
    assert info.arch == "timm:resnet18" and info.arch_kwargs == {"num_classes": 3, "in_channels": 1}
    assert info.class_names == ("c0", "c2") and info.input.channels == 1 and info.dataset == "imagefolder"
    # The same cut in memory, from the same weights and profile.
    in_memory = modellego.disassemble(source, [0, 2], profile=profile, calibrate="none")
    x = torch.randn(5, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = loaded(x), in_memory(x)
    assert want.abs().max() > 1e-2  # logits of a scale the tolerance means something against
    assert relative_error(got, want) <= 1e-6
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in source.parameters())


def test_evaluate_takes_a_library_model_too(folder, weights, capsys) -> None:
    import json
    capsys.readouterr()
    assert main(["evaluate", "timm:resnet18", "--weights", str(weights[1]["pt"]), *data_args(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "timm:resnet18" and result["kind"] == "model"
    assert result["cost"]["params"] == sum(p.numel() for p in weights[0].parameters())


@pytest.mark.parametrize("name,close", [("timm:resnt18", "'timm:resnet18'"),
                                        ("torchvision:mobilenet_v22", "'torchvision:mobilenet_v2'"),
                                        ("timm:../resnet18", "is not a name"),
                                        ("keras:resnet18", "unknown model library 'keras'")])
def test_an_unknown_name_is_one_line_with_close_matches(folder, tmp_path, capsys, name: str, close: str) -> None:
    line = one_line_error(capsys, ["profile", name, *data_args(folder), "-o", str(tmp_path / "p.safetensors")])
    assert close in line
    assert not (tmp_path / "p.safetensors").exists()


def test_weights_that_do_not_fit_are_one_line_naming_the_tensors(folder, weights, tmp_path, capsys) -> None:
    state = dict(weights[0].state_dict())
    state.pop("fc.bias")
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)  # of a 3-channel resnet18
    state["head.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    line = one_line_error(capsys, ["profile", "timm:resnet18", "--weights", str(bad), *data_args(folder),
                                   "-o", str(tmp_path / "p.safetensors")])
    assert "does not fit timm:resnet18 (num_classes=3, in_channels=1)" in line
    assert "1 missing (fc.bias)" in line and "1 unexpected (head.weight)" in line
    assert "1 mis-shaped (conv1.weight: [64, 3, 7, 7] in the file, [64, 1, 7, 7] in the model)" in line
    # Built for more classes than the weights have: the classifier is named.
    line = one_line_error(capsys, ["profile", "timm:resnet18", "--weights", str(weights[1]["safetensors"]),
                                   "--num-classes", "5", *data_args(folder), "-o", str(tmp_path / "p.safetensors")])
    assert "fc.weight: [3, 512] in the file, [5, 512] in the model" in line
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "is not a readable state dict" in one_line_error(
        capsys, ["profile", "timm:resnet18", "--weights", str(junk), *data_args(folder), "-o", str(tmp_path / "p")])
    assert "goes with MODEL timm:NAME" in one_line_error(
        capsys, ["profile", str(junk), "--weights", str(junk), *data_args(folder), "-o", str(tmp_path / "p")])
    assert not any(tmp_path.glob("p*"))


def test_a_pt_file_is_read_without_pickle_code(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(UserError, match="is not a readable state dict"):
        read_state_dict(path)
    torch.save({"state_dict": {"module.a": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert list(read_state_dict(tmp_path / "wrapped.pt")) == ["a"]  # a checkpoint's state dict, DataParallel names


TAMPERED = [
    (lambda m: m.update(arch="timm:resnet34"), "tensors do not fit the description"),
    (lambda m: m.update(arch="timm:no_such_net"), "unknown timm model 'no_such_net'"),
    (lambda m: m.update(arch="builtins:eval"), "unknown model library 'builtins'"),
    (lambda m: m.update(arch="timm:resnet18;import os"), "is not a name"),
    (lambda m: m["arch_kwargs"].update(drop_rate=0.5), "takes only num_classes and in_channels; got drop_rate"),
    (lambda m: m["arch_kwargs"].update(pretrained=True), "takes only num_classes and in_channels; got pretrained"),
    (lambda m: m["arch_kwargs"].update(num_classes=2), "fc: kept index out of range [0, 2)"),
    (lambda m: m["arch_kwargs"].update(in_channels=10**6), "arch_kwargs.in_channels: expected an integer"),
]


@pytest.mark.parametrize("edit,match", TAMPERED, ids=[m for _, m in TAMPERED])
def test_a_file_whose_recorded_architecture_was_tampered_with_is_refused(cut, tmp_path, edit, match: str) -> None:
    path = tmp_path / "c.safetensors"
    shutil.copy(cut["component"] / "model.safetensors", path)
    rewrite_header(path, lambda h: edit(h["model"]))  # re-hashed: only the edit itself is wrong
    with pytest.raises(CorruptFileError) as info:
        modellego.load(path)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_without_the_library_loading_says_to_install_it_or_pass_model(cut, weights, monkeypatch) -> None:
    path = cut["component"]
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    with pytest.raises(LibraryMissingError) as info:
        modellego.load(path)
    msg = str(info.value)
    assert "\n" not in msg and "timm:resnet18 needs timm" in msg and "pip install timm" in msg and "model=" in msg
    assert not isinstance(info.value, CorruptFileError)  # the machine's fault, not the file's
    with pytest.raises(LibraryMissingError):
        modellego.create_model("timm:resnet18")
    # An instance of the architecture still rebuilds it (the plan replayed on a copy).
    source = weights[0]
    loaded = modellego.load(path, model=source)
    x = torch.randn(2, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(loaded(x), modellego.load(path)(x))


def test_torchvision_models_build_by_name_with_other_input_channels(tmp_path) -> None:
    torch.manual_seed(0)
    model = modellego.create_model("torchvision:mobilenet_v2", num_classes=4, in_channels=1).eval()
    assert type(model) is torchvision.models.MobileNetV2 and model.features[0][0].in_channels == 1
    assert get_info(model).arch_kwargs == {"num_classes": 4, "in_channels": 1}
    set_info(model, get_info(model).replace(input=InputSpec(1, (SIDE, SIDE), (0.5,), (0.25,))))
    x, y = torch.randn(8, 1, SIDE, SIDE), torch.arange(8) % 4
    comp = modellego.disassemble(model, [3, 1], batches=[(x, y)], select=False, calibrate="none")
    loaded = modellego.load(modellego.save(comp, tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(loaded(x), comp(x))
    assert get_info(loaded) == get_info(comp)


def test_create_model_checks_the_arguments_of_library_models() -> None:
    with pytest.raises(UserError, match="takes only num_classes and in_channels"):
        modellego.create_model("timm:resnet18", drop_rate=0.2)
    with pytest.raises(UserError, match="no width multiplier"):
        modellego.create_model("timm:resnet18", width=0.5)
    with pytest.raises(UserError, match="num_classes must be an integer"):
        modellego.create_model("torchvision:resnet18", num_classes=2.5)
    with pytest.raises(UnknownNameError, match="Did you mean 'torchvision:resnet18'"):
        modellego.create_model("torchvision:resnet18.a1_in1k")  # tags are timm's only
    model = modellego.create_model("timm:RESNET18", num_classes=2, in_channels=3)
    assert get_info(model).arch == "timm:resnet18" and model.fc.out_features == 2


def test_load_weights_names_what_does_not_fit() -> None:
    torch.manual_seed(0)
    model = modellego.create_model("timm:test_resnet", num_classes=3, in_channels=1)
    other = modellego.create_model("timm:test_resnet", num_classes=3, in_channels=1)
    state = {k: v for k, v in other.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert load_weights(model, state) is model  # published checkpoints often lack the BatchNorm counters
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    first = next(k for k in state if k.endswith("weight"))
    state[first] = state[first].long()
    with pytest.raises(UserError, match="of another dtype"):
        load_weights(model, state)
