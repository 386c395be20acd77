"""`--stream` in the command line: an image folder read image by image gives what the in-memory read gives."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import vision_models

import modellego
from modellego.cli import main
from modellego.core.profiling import Profile
from modellego.evaluation.protocol import model_folder, model_stream
from modellego.io.info import get_info

from helpers import torchrun

PIL = pytest.importorskip("PIL.Image")
SIDE = 28


def _tree(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """train/val/test folders of 3 classes, 28x28 RGB PNGs whose colour tells the class."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (SIDE, SIDE, 3))
                img[..., c] += 150 + rng.integers(0, 40)
                img[rng.integers(0, SIDE), :, (c + 1) % 3] = 255  # a stripe: some variety inside a class
                PIL.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream")
    data = root / "images"
    _tree(data, {"train": 40, "val": 6, "test": 12})
    model = root / "model.safetensors"
    assert main(["train", "--model", "lenet5", "--data", "imagefolder", "--data-dir", str(data), "--epochs", "6",
                 "--batch-size", "16", "--lr", "0.05", "-o", str(model)]) == 0
    return data, model


def _data(data: Path, stream: bool) -> list[str]:
    return ["--data", "imagefolder", "--data-dir", str(data)] + (["--stream", "--resize", str(SIDE)] if stream else [])


def test_streamed_profile_equals_the_in_memory_one(trained, tmp_path) -> None:
    data, model = trained
    for stream in (False, True):
        assert main(["profile", str(model), *_data(data, stream), "--min-per-class", "3", "-o",
                     str(tmp_path / f"{stream}.profile")]) == 0
    mem, streamed = (Profile.load(tmp_path / f"{s}.profile") for s in (False, True))
    assert mem.provenance["selection"] == streamed.provenance["selection"]
    assert mem.in_masks.keys() == streamed.in_masks.keys() and mem.in_masks
    for layer in mem.in_masks:
        assert torch.equal(mem.in_masks[layer], streamed.in_masks[layer]), layer
        assert torch.equal(mem.out_masks[layer], streamed.out_masks[layer]), layer
    assert any(not m.all() for m in mem.in_masks.values())  # the masks say something


def test_streamed_evaluation_equals_the_in_memory_one(trained, capsys) -> None:
    data, model = trained
    results = []
    for stream in (False, True):
        capsys.readouterr()
        assert main(["evaluate", str(model), *_data(data, stream), "--classes", "0,2", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    mem, streamed = results
    assert mem["accuracy"] == streamed["accuracy"] and mem["masked_accuracy"] == streamed["masked_accuracy"]
    assert mem["accuracy"]["counts"] == {"0": 12, "2": 12}
    assert streamed["accuracy"]["mean_per_class"] > 60  # the model learnt the colours: not a vacuous match


def test_streamed_disassemble_calibrates_and_skips_a_bad_image(trained, tmp_path, capsys) -> None:
    data, model = trained
    (data / "train" / "class1" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    try:
        comp = tmp_path / "comp.safetensors"
        assert main(["disassemble", str(model), "--classes", "0,1", *_data(data, True), "--min-per-class", "3",
                     "--calibration-images", "50", "-o", str(comp)]) == 0
    finally:
        (data / "train" / "class1" / "zz-broken.png").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(comp), *_data(data, True), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "component" and result["classes"] == [0, 1]
    assert result["accuracy"]["mean_per_class"] > 60


def test_stream_needs_an_image_folder(trained, tmp_path, capsys) -> None:
    _, model = trained
    assert main(["profile", str(model), "--data", "mnist", "--stream", "-o", str(tmp_path / "p.profile")]) == 2
    assert "--stream reads an image folder" in capsys.readouterr().err
    assert not (tmp_path / "p.profile").exists()


def test_streamed_profile_under_torchrun_shards_the_folder(trained, tmp_path) -> None:
    """Two processes read every other image each; the profile is one process's (up to float32 ties)."""
    data, model = trained
    one, two = tmp_path / "one.profile", tmp_path / "two.profile"
    assert main(["profile", str(model), *_data(data, True), "--min-per-class", "3", "-o", str(one)]) == 0
    torchrun("profile", str(model), *_data(data, True), "--min-per-class", "3", "-o", str(two))
    a, b = Profile.load(one), Profile.load(two)
    assert (a.provenance["processes"], b.provenance["processes"]) == (1, 2)
    assert a.provenance["selection"]["seen"] == b.provenance["selection"]["seen"] == {"0": 40, "1": 40, "2": 40}
    same = torch.cat([(a.in_masks[k] == b.in_masks[k]).flatten() for k in a.layers]).float().mean()
    assert same > 0.99, float(same)


def test_streamed_disassemble_under_torchrun_calibrates_from_every_shard(trained, tmp_path) -> None:
    """Each process draws from its shard and calibrates from its share of the whole draw: the
    component is one process's (every task image drawn: all 80, and a draw of 30 of them). Its
    float32 normal equations sum in another order, which moves the test images' logits by about
    1e-4 of their scale (float64: 1e-9, tests/test_distributed.py); a draw keyed by each shard's
    own positions moved them by 1e-2."""
    from modellego.cut.disassemble import relative_error
    data, model = trained
    x = torch.cat([b[0] for b in model_stream(modellego.load(model), model_folder(modellego.load(model), data, "test"),
                                              "test", classes=[0, 1])])
    for images, drawn in (("500", 80), ("30", 30)):
        one, two = tmp_path / f"one{images}.safetensors", tmp_path / f"two{images}.safetensors"
        argv = ["disassemble", str(model), "--classes", "0,1", *_data(data, True), "--min-per-class", "3",
                "--calibration-images", images]
        assert main([*argv, "-o", str(one)]) == 0
        torchrun(*argv, "-o", str(two))
        a, b = (modellego.load(p) for p in (one, two))
        assert get_info(b).provenance["profile"]["processes"] == 2
        assert get_info(a).provenance["calibration"]["images"] == get_info(b).provenance["calibration"]["images"] == drawn
        assert {k: v.shape for k, v in b.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}
        with torch.no_grad():
            assert relative_error(b(x).double(), a(x).double()) < 1e-3


def _count_walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import modellego.data.stream as stream
    walked: list[str] = []
    real = stream._walk_images

    def walk(folder, suffixes):
        walked.append(Path(folder).name)
        return real(folder, suffixes)

    monkeypatch.setattr(stream, "_walk_images", walk)
    return walked


def test_a_streamed_command_walks_the_training_folder_once(trained, tmp_path, monkeypatch) -> None:
    data, model = trained
    walked = _count_walks(monkeypatch)
    assert main(["disassemble", str(model), "--classes", "0,1", *_data(data, True), "--min-per-class", "3",
                 "--calibration-images", "50", "-o", str(tmp_path / "comp")]) == 0  # profiles, then calibrates
    assert walked == ["class0", "class1", "class2"]  # each class folder of train/, once
    timm = vision_models.load("timm")
    if timm is None:
        pytest.skip("timm is not installed")
    walked.clear()  # a library model takes its classes from the folder's listing: the same one
    assert main(["profile", "timm:test_resnet", *_data(data, True), "--input-size", str(SIDE),
                 "-o", str(tmp_path / "p.profile")]) == 0
    assert walked == ["class0", "class1", "class2"]
