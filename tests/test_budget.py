"""Locating under a FLOPs budget: components that fit it exactly, and how the share is chosen."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.core.graph import trace
from modellego.core.locate import keep_channels, locate_class
from modellego.cut.budget import locate_budget, output_positions, plan_flops
from modellego.cut.prune import build_plan, full_plan
from modellego.errors import UserError
from modellego.evaluation.metrics import count_flops
from modellego.io.info import get_info

from helpers import GroupedNet
from helpers import profiled_with_contributions as _setup

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")
SHAPE = (1, 28, 28)


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


def test_a_budget_counts_a_grouped_convolutions_flops_group_by_group() -> None:
    model = GroupedNet().eval()
    x = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(24) % 5)], select=False, keep_contributions=True)
    full = count_flops(model, SHAPE)
    comp = modellego.disassemble(model, [0, 1, 2], profile=prof, flops=0.5)
    got = count_flops(comp, SHAPE)
    assert comp.get_submodule("grouped.0").groups > 1 and got <= 0.5 * full
    assert get_info(comp).provenance["flops_budget"]["flops_ratio"] == pytest.approx(got / full, abs=1e-6)
