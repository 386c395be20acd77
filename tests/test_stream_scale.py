"""benchmarks/stream_scale.py: the generated ImageNet-layout folder is seeded, reused and readable by
the streamed loader; the probe head makes a random trunk classify it; the report states the targets."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _module("benchmarks_stream_scale", "stream_scale.py")


def test_folder_is_seeded_reused_and_nested(bench, tmp_path):
    small = bench.make_folder(tmp_path, 3, 2, 24)
    files = sorted(p.relative_to(small).as_posix() for p in small.rglob("*.JPEG"))
    assert files == [f"train/n0000000{c}/n0000000{c}_{i}.JPEG" for c in range(3) for i in range(2)]
    stamp = (small / "done.json").stat().st_mtime_ns
    assert bench.make_folder(tmp_path, 3, 2, 24) == small and (small / "done.json").stat().st_mtime_ns == stamp
    large = bench.make_folder(tmp_path, 3, 4, 24)  # image i of class c is seeded by (seed, c, i)
    for f in files:
        assert (small / f).read_bytes() == (large / f).read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_probe_head_classifies_the_folder_through_the_streamed_loader(bench, tmp_path):
    from modellego.evaluation.protocol import model_stream
    from modellego.files import load

    folder = bench.make_folder(tmp_path, 4, 2, 24)
    path = tmp_path / "model.safetensors"
    bench.prepare_model("resnet18", 16, 4, 24, 0, "cpu", path)
    model = load(path)
    stream = model_stream(model, folder, batch_size=3)
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in stream]
    predicted, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (predicted == labels).float().mean() >= 0.75  # random weights alone: about 1 in 4


def _row(method: str, per_class: int, seconds: float, peak: int, **extra) -> dict:
    images = 1000 * per_class
    return {"model": "vgg16_bn", "width": 1.0, "size": 32, "stored_side": 46, "classes": 1000, "batch": 256, "workers": 2,
            "torch": "x", "gflops_per_image": 0.63, "images_per_class": per_class, "folder_mib": 1.0, "method": method,
            "processes": 1, "threads": 2,
            "device": "cpu", "images": images, "seconds": seconds, "images_per_s": round(images / seconds, 2),
            "base_rss_mib": 400, "peak_rss_mib": peak, **extra}


def test_report_states_each_target(tmp_path):
    report = _module("benchmarks_report_stream", "report.py")
    prof = {"select_s": 1.0, "contributions_s": 1.0, "selected": 10, "correct": 20, "profile_classes": 10}
    rows = [_row("forward", 2, 10.0, 600), _row("profile", 2, 20.0, 700, **prof),
            _row("forward", 8, 40.0, 600), _row("profile", 8, 45.0, 707, **prof),
            _row("profile", 2, 12.0, 690, **prof, launch_s=20.0, rank_peak_rss_mib=[690, 650], same_selection=True,
                 identical=False, mask_entries=100, mask_entries_equal=99) | {"processes": 2}]
    cal = {"task_classes": [0, 1], "calibrate": "recon+balance", "calibration_images": 4, "draw_s": 0.1, "params": 5,
           "source_params": 10}
    rows += [_row("calibrate", 2, 4.0, 650, **cal),
             _row("calibrate", 2, 3.0, 640, **cal, launch_s=9.0, rank_peak_rss_mib=[640, 630], same_shapes=True,
                  logits_relative_error=2.5e-6) | {"processes": 2}]
    with (tmp_path / "stream_scale.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = report.sec_stream_scale(report.Results(tmp_path))
    assert "met by VGG-16-BN, 32×32, 8,000 images, 10 classes profiled: 0.89x" in text
    assert "missed by VGG-16-BN, 32×32, 2,000 images, 10 classes profiled: 0.50x" in text
    assert "+7 MiB (+1.0%) from the 2,000- to the 8,000-image folder" in text
    assert "99 of 100 mask entries equal (not met)" in text
    assert "2,000 task images: logits 2.5e-06 of their scale apart" in text
