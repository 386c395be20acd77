"""Model compression (`modellego.apps.compress`, `modellego compress`): the component of every class."""
from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.apps.compress import compress, compress_sweep, markdown_table, tradeoff_figure
from modellego.cli import main
from modellego.cut.disassemble import relative_error
from modellego.errors import UserError
from modellego.evaluation.metrics import count_flops
from modellego.io.info import get_info

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")
SHAPE = (1, 28, 28)


def _masked_copy(model: nn.Module, plan: dict) -> nn.Module:
    """The source with every channel the plan drops zeroed at its producer (weights, biases and BatchNorm)."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, dims in plan.items():
            m = modules[name]
            drop = torch.ones(m.weight.shape[0], dtype=torch.bool)
            drop[dims["out"]] = False  # the classifier keeps every class: nothing dropped there
            m.weight[drop] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[drop] = 0
    return masked


def test_paper_form_keeps_every_channel_some_class_uses(profiled) -> None:
    ds, model, prof = profiled
    comp = compress(model, profile=prof, calibrate="none")
    plan = get_info(comp).pruning
    assert get_info(comp).classes == tuple(range(len(ds.classes)))
    dropped_any = False
    for layer, masks in prof.in_masks.items():
        used = torch.nonzero(masks.any(0)).flatten().tolist()  # inputs of the layer some class relies on
        assert set(used) <= set(plan[layer]["in"]), layer
        dropped_any |= len(plan[layer]["in"]) < masks.shape[1]
    assert dropped_any  # it is a compression: something no class uses went


def test_all_class_component_equals_the_masked_source(resnet) -> None:
    model, x, prof = resnet
    comp = compress(model, profile=prof, calibrate="none", flops=0.5)
    masked = _masked_copy(model, get_info(comp).pruning)
    inputs = 3 * x[:8]  # logits well away from zero
    with torch.no_grad():
        want, got = masked(inputs), comp(inputs)
    assert want.abs().max() > 1e-2
    assert relative_error(got, want) < 1e-4
    with torch.no_grad():  # a component that differs in one kept BatchNorm shift must fail the same check
        bn = [m for m in comp.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        bn.bias[0] += 0.5
        assert relative_error(comp(inputs), want) > 1e-3


@pytest.mark.parametrize("budget", [0.6, 0.35])
def test_a_budget_is_kept_and_nearly_reached(resnet, budget: float) -> None:
    model, _, prof = resnet
    comp = compress(model, profile=prof, calibrate="none", flops=budget)
    ratio = count_flops(comp, SHAPE) / count_flops(model, SHAPE)
    assert budget - 0.03 <= ratio <= budget  # the per-layer fill lands within 3 points of the budget
    assert ratio == pytest.approx(get_info(comp).provenance["flops_budget"]["flops_ratio"], abs=1e-6)


def test_compress_from_a_one_shot_iterator_profiles_and_calibrates_in_one_pass(profiled) -> None:
    ds, model, _ = profiled
    from modellego.data import batches
    from modellego.evaluation.protocol import model_transform
    reads = []

    def once():
        for b in batches(ds.train, 128, transform=model_transform(model, ds)):
            reads.append(1)
            yield b

    comp = compress(model, once(), flops=0.6, calibration_images=300, select=False)
    prov = get_info(comp).provenance
    assert prov["calibration"]["method"] == "recon+balance" and prov["calibration"]["images"] == 300
    assert len(reads) == -(-len(ds.train) // 128)  # every batch read exactly once


def test_a_profile_of_some_classes_is_refused(profiled) -> None:
    ds, model, _ = profiled
    from modellego.data import batches
    from modellego.evaluation.protocol import model_transform
    part = modellego.profile(model, batches(ds.train, 256, transform=model_transform(model, ds)), classes=[0, 1])
    with pytest.raises(UserError, match="covers 2 of the model's 6 classes"):
        compress(model, profile=part, calibrate="none")


def test_sweep_rows_table_and_figure(profiled) -> None:
    ds, model, _ = profiled
    rows, models = compress_sweep(model, ds, [0.8, 0.5], paper=True, calibration_images=300, latency_batch=4)
    assert [r.name for r in rows] == ["source", "paper thresholds", "FLOPs 0.8", "FLOPs 0.5"] and len(models) == 3
    assert rows[0].flops_ratio == 1.0 and all(r.flops_ratio <= r.budget for r in rows[2:])
    assert rows[3].flops < rows[2].flops and all(0 <= r.accuracy <= 100 for r in rows)
    table = markdown_table(rows)
    assert table.count("\n") == 6 and "FLOPs 0.5" in table
    fig = tradeoff_figure(rows, "t")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) >= 2
    with pytest.raises(UserError, match="fractions in"):
        compress_sweep(model, ds, [1.5])


def test_cli_writes_a_loadable_model_and_a_sweep_folder(tmp_path: Path, capsys) -> None:
    src = tmp_path / "m.safetensors"
    assert main(["train", "--model", "vgg11_bn", "--width", "0.125", "--data", "synthetic", "--epochs", "1",
                 "--train-limit", "800", "--batch-size", "16", "--lr", "0.05", "-o", str(src)]) == 0
    model = modellego.load(src)
    shape = (3, 28, 28) if get_info(model).input is None else (get_info(model).input.channels, *get_info(model).input.size)
    common = ["--data", "synthetic", "--calibration-images", "300"]
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(src), "--flops", "0.6", *common, "-o", str(out)]) == 0
    loaded = modellego.load(out)
    assert get_info(loaded).classes == get_info(model).classes
    assert count_flops(loaded, shape) <= 0.6 * count_flops(model, shape)
    folder = tmp_path / "sweep"
    assert main(["compress", str(src), "--flops", "0.7,0.4", "--paper", *common, "-o", str(folder)]) == 0
    names = {p.name for p in folder.iterdir()}
    assert {"compress.json", "compress.md", "compress.png", "flops-0.4.safetensors", "flops-0.7.safetensors",
            "paper.safetensors"} <= names
    assert get_info(modellego.load(folder / "paper.safetensors")).provenance.get("flops_budget") is None
    rows = json.loads((folder / "compress.json").read_text())
    assert [r["budget"] for r in rows] == [1.0, None, 0.7, 0.4]
    capsys.readouterr()
    assert main(["compress", str(src), "--flops", "0,0.5", *common, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "expected a value in (0, 1]" in err


def test_torch_pruning_is_not_a_core_dependency() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("torch-pruning") for d in project["dependencies"])


@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet18", "mobilenet_v2"])
def test_torch_pruning_channels_read_back_as_a_plan(arch: str) -> None:
    """benchmarks/compress.py compares criteria on one refit: the plan it reads back must be Torch-Pruning's cut."""
    tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is a benchmark dependency (make test installs it)")
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from compress import check_plan, tp_plan, tp_prune  # benchmarks/compress.py

    from modellego.core.graph import trace
    from modellego.cut.prune import full_plan

    from helpers import described_model
    model = described_model(arch, 0.125, seed=0, num_classes=5)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    pruned, history = tp_prune(tp, model, x, lambda: tp.importance.MagnitudeImportance(p=2), False, 0.5, None)
    plan = tp_plan(tp, model, x, history, full_plan(trace(model, x)))
    ours = check_plan(model, plan, pruned)
    assert sum(len(d["out"]) for d in plan.values()) < sum(len(d["out"]) for d in full_plan(trace(model, x)).values())
    with torch.no_grad():
        assert relative_error(ours(x), pruned(x)) < 1e-6
    name = next(k for k, d in plan.items() if "in" in d and len(d["out"]) > 1)
    plan[name]["out"] = plan[name]["out"][::-1]  # a wrong plan must not pass the check
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_plan(model, plan, pruned)
