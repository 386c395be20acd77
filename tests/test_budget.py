"""Locating under a FLOPs budget, and profiles that keep their contributions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import described_model
from safetensors.torch import load_file, save_file

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, keep_channels, locate_class, relevant_inputs
from modellego.core.profile import Profile
from modellego.cut.budget import locate_budget, output_positions, plan_flops
from modellego.cut.prune import build_plan, full_plan
from modellego.errors import CorruptFileError, UserError
from modellego.evaluation.metrics import count_flops
from modellego.io.info import get_info

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")
SHAPE = (1, 28, 28)


def _setup(name: str, width: float, seed: int = 0):
    model = described_model(name, width, seed=seed, num_classes=5, dataset="d")
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(40, *SHAPE, generator=g), torch.arange(40) % 5
    return model, x, modellego.profile(model, [(x, y)], select=False, keep_contributions=True)


@pytest.fixture(scope="module")
def resnet():
    return _setup("resnet18", 0.125)


@pytest.mark.parametrize("name,width", [("lenet5", 0.5), ("vgg11_bn", 0.125), ("resnet18", 0.125),
                                        ("googlenet", 0.0625), ("mobilenet_v2", 0.125),
                                        ("mobilenet_v3_small", 0.125)])
def test_budgeted_component_fits_and_is_exact(name: str, width: float) -> None:
    model, x, prof = _setup(name, width)
    full = count_flops(model, SHAPE)
    for budget in (0.6, 0.3):
        comp = modellego.disassemble(model, [0, 3], profile=prof, flops=budget)
        got = count_flops(comp, SHAPE)
        recorded = get_info(comp).provenance["flops_budget"]
        assert got <= budget * full
        # The analytic count used by the search is the one torch's flop counter reports.
        assert recorded["flops_ratio"] == pytest.approx(got / full, abs=1e-6)
        assert recorded["budget"] == budget and 0 < recorded["keep_fraction"] <= 1
    # Exactness is checked inside disassemble (verify=True): component == masked source.


def test_plan_flops_of_the_full_plan_is_the_models_flops(resnet) -> None:
    model, x, _ = resnet
    graph = trace(model, x[:1])
    assert plan_flops(model, full_plan(graph), output_positions(model, graph, x[:1])) == count_flops(model, SHAPE)


def test_a_larger_budget_keeps_at_least_as_much(resnet) -> None:
    model, x, prof = resnet
    graph = trace(model, x[:2])
    small = locate_budget(model, graph, x[:2], prof, [1, 2], 0.25)
    large = locate_budget(model, graph, x[:2], prof, [1, 2], 0.6)
    assert small.flops_ratio <= 0.25 < large.flops_ratio <= 0.6
    assert small.keep_fraction < large.keep_fraction
    assert sum(map(len, small.keep.values())) < sum(map(len, large.keep.values()))


def test_keep_fraction_rule_by_hand() -> None:
    layer = trace(nn.Sequential(nn.Linear(4, 3)), torch.zeros(1, 4)).layers["0"]
    r = torch.tensor([[1.0, 0.5, 0.0, 0.35],
                      [0.1, 1.0, 0.0, 0.45],
                      [0.9, 0.9, 0.9, 0.9]], dtype=torch.float64)
    out_mask = torch.tensor([True, True, False])
    th = Thresholds(linear_alpha=0.4)
    # Eq. 6 counts over relevant outputs 0, 1: [1, 2, 0, 1]; ties (inputs 0 and 3) by summed r: 1.1 > 0.8.
    assert relevant_inputs(layer, r, out_mask, th, 0.25).tolist() == [False, True, False, False]
    assert relevant_inputs(layer, r, out_mask, th, 0.5).tolist() == [True, True, False, False]
    assert relevant_inputs(layer, r, out_mask, th, 0.75).tolist() == [True, True, False, True]
    # Input 2 contributes nothing to a relevant output: never kept, whatever the share.
    assert relevant_inputs(layer, r, out_mask, th, 1.0).tolist() == [True, True, False, True]


def test_classes_located_together_add_their_counts_by_hand() -> None:
    layer = trace(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4)).layers["0"]
    r = torch.tensor([[[1.0, 0.5, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]],
                      [[0.0, 0.6, 0.0, 0.3],
                       [0.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)  # (C=2, Q=2, P=4)
    out_mask = torch.tensor([True, True])
    th = Thresholds(linear_alpha=0.4)
    # Counts: class 0 [1, 1, 0, 1], class 1 [0, 2, 0, 0]; together [1, 3, 0, 1].
    assert relevant_inputs(layer, r, out_mask, th, 0.25).tolist() == [False, True, False, False]
    # Ties 0 and 3 by summed r over both classes: 1.0 < 1.3.
    assert relevant_inputs(layer, r, out_mask, th, 0.5).tolist() == [False, True, False, True]
    # One class stacked alone is the class on its own.
    for f in (None, 0.25, 0.5, 1.0):
        assert torch.equal(relevant_inputs(layer, r[:1], out_mask, th, f), relevant_inputs(layer, r[0], out_mask, th, f))


def test_a_budget_keeps_one_share_per_layer_for_the_whole_task() -> None:
    """In a plain chain every space has one reader, so no layer keeps more than ceil(f·P) inputs."""
    model, x, prof = _setup("vgg11_bn", 0.125, seed=3)
    graph = trace(model, x[:2])
    got = locate_budget(model, graph, x[:2], prof, [0, 2, 4], 0.3)
    modules = dict(model.named_modules())
    plan = build_plan(graph, got.keep)
    for name, dims in plan.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d) and m.in_channels > 1:
            assert len(dims["in"]) <= math.ceil(m.in_channels * got.keep_fraction)
    assert got.flops_ratio <= 0.3


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


def test_budget_errors(resnet) -> None:
    model, x, prof = resnet
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match=r"\(0, 1\]"):
            modellego.disassemble(model, [0], profile=prof, flops=bad)
    with pytest.raises(UserError, match="no component"):
        modellego.disassemble(model, [0, 1, 2, 3, 4], profile=prof, flops=1e-6)
    plain = modellego.profile(model, [(x, torch.arange(40) % 5)], select=False)
    assert plain.contributions is None
    with pytest.raises(UserError, match="keep_contributions"):
        modellego.disassemble(model, [0], profile=plain, flops=0.5)


def test_disassemble_from_batches_with_a_budget_profiles_with_contributions(resnet) -> None:
    model, x, _ = resnet
    comp = modellego.disassemble(model, [2, 4], batches=[(x, torch.arange(40) % 5)], select=False, flops=0.4)
    assert count_flops(comp, SHAPE) <= 0.4 * count_flops(model, SHAPE)


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


def test_only_the_chosen_trial_warns_about_unused_spaces(caplog) -> None:
    model, x, prof = _setup("googlenet", 0.0625)  # at 5% of the FLOPs, whole inception branches go unused
    graph = trace(model, x[:2])
    with caplog.at_level("WARNING", logger="modellego.locate"):
        got = locate_budget(model, graph, x[:2], prof, [1], 0.05)
    messages = [r.getMessage() for r in caplog.records if "no class uses" in r.getMessage()]
    assert messages and len(messages) == len(set(messages))  # sixteen bisection trials, one set of warnings
    assert got.flops_ratio <= 0.05


def test_class_rank_is_the_union_of_each_class_at_its_share() -> None:
    model, x, prof = _setup("vgg11_bn", 0.125, seed=3)
    graph = trace(model, x[:2])
    got = locate_budget(model, graph, x[:2], prof, [0, 2, 4], 0.3, rank="class")
    assert got.rank == "class" and got.to_json()["rank"] == "class" and got.flops_ratio <= 0.3
    union: dict[str, torch.Tensor] = {}
    for row, c in zip(prof.rows([0, 2, 4]), [0, 2, 4]):
        ins, _ = locate_class(graph, {k: v[row] for k, v in prof.contributions.items()}, c, prof.thresholds,
                              keep_fraction=got.keep_fraction)
        union = {k: union[k] | v if k in union else v for k, v in ins.items()}
    assert got.keep == keep_channels(graph, union, [0, 2, 4])
    # The same budget ranked for the task together keeps a larger share of every layer.
    assert locate_budget(model, graph, x[:2], prof, [0, 2, 4], 0.3).keep_fraction > got.keep_fraction
    with pytest.raises(UserError, match="unknown budget rank"):
        locate_budget(model, graph, x[:2], prof, [0, 2, 4], 0.3, rank="classes")
