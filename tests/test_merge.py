"""Merging components of one source: the union of their channels, exactly the masked source."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.assembly.assemble import assemble
from modellego.core.graph import trace
from modellego.core.locate import keep_channels
from modellego.cut.disassemble import masked_forward
from modellego.errors import UserError
from modellego.io.info import get_info

from helpers import GroupedNet, described_model

NUM_CLASSES = 5
SHAPE = (1, 28, 28)
ZOO = [("lenet5", 0.25), ("vgg11_bn", 0.0625), ("resnet18", 0.0625), ("googlenet", 0.0625), ("mobilenet_v2", 0.125),
       ("mobilenet_v3_small", 0.125)]
pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def build(name: str, width: float, seed: int = 0) -> nn.Module:
    return described_model(name, width, seed, num_classes=NUM_CLASSES, channels=SHAPE[0], size=SHAPE[1:])


def profile_of(model: nn.Module, seed: int = 1):
    x = torch.randn(20, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return modellego.profile(model, [(x, torch.arange(20) % NUM_CLASSES)], select=False)


def assert_is_masked_union(merged: nn.Module, model: nn.Module, prof, tasks: list[list[int]]) -> None:
    """merged(x) == the source with every channel outside the union of the tasks' channels zeroed."""
    m64 = copy.deepcopy(model).double()
    graph = trace(m64, torch.randn(2, *SHAPE, dtype=torch.float64))
    keeps = [keep_channels(graph, prof.task_in_masks(t), t) for t in tasks]
    union = {s: sorted(set().union(*(k[s] for k in keeps))) for s in keeps[0]}
    classes = list(dict.fromkeys(c for t in tasks for c in t))
    union[graph.segments(graph.output)[0].space] = classes
    x = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = copy.deepcopy(merged).double()(x)
    torch.testing.assert_close(got, masked_forward(m64, graph, union, x)[:, classes], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name,width", ZOO, ids=[z[0] for z in ZOO])
def test_merge_equals_the_source_masked_to_the_union(name: str, width: float) -> None:
    model = build(name, width)
    prof = profile_of(model)
    tasks = [[0, 2], [3, 1], [2, 4]]  # overlapping: class 2 appears once in the merge
    comps = [modellego.disassemble(model, t, profile=prof) for t in tasks]
    merged = modellego.merge(model, comps)
    info = get_info(merged)
    assert info.classes == (0, 2, 3, 1, 4) and info.kind == "component"
    assert len(info.provenance["merged_from"]) == 3

    assert_is_masked_union(merged, model, prof, tasks)
    # Shared channels are computed once: smaller than the padded assembly, larger than any component.
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    pair = modellego.merge(model, comps[:2])
    assert max(n(c) for c in comps[:2]) < n(pair) < n(assemble(comps[:2], mode="padded"))


def test_merge_of_a_task_split_equals_disassembling_the_whole_task(tmp_path) -> None:
    model = build("resnet18", 0.0625)
    prof = profile_of(model)
    merged = modellego.merge(model, [modellego.disassemble(model, [1, 4], profile=prof),
                                     modellego.disassemble(model, [0], profile=prof)])
    whole = modellego.disassemble(model, [1, 4, 0], profile=prof)
    a, b = merged.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert get_info(merged).pruning == get_info(whole).pruning
    back = modellego.load(modellego.save(merged, tmp_path / "merged.safetensors"))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(back(x), merged(x))


def test_merge_of_components_of_a_component() -> None:
    model = build("googlenet", 0.0625)
    middle = modellego.disassemble(model, [0, 1, 2, 3], profile=profile_of(model))
    prof = profile_of(middle)
    comps = [modellego.disassemble(middle, [0, 3], profile=prof), modellego.disassemble(middle, [2], profile=prof)]
    merged = modellego.merge(middle, comps)
    assert get_info(merged).classes == (0, 3, 2)
    assert_is_masked_union(merged, middle, prof, [[0, 3], [2]])


def test_merge_refuses_foreign_components_and_assemblies() -> None:
    model, other = build("lenet5", 0.25, 0), build("lenet5", 0.25, 1)
    mine = modellego.disassemble(model, [0, 1], profile=profile_of(model))
    theirs = modellego.disassemble(other, [2], profile=profile_of(other))
    with pytest.raises(UserError, match="not cut from this source"):
        modellego.merge(model, [mine, theirs])
    with pytest.raises(UserError, match="not a component"):
        modellego.merge(model, [assemble([mine, theirs])])
    with pytest.raises(UserError, match="nothing to merge"):
        modellego.merge(model, [])


def test_merge_of_components_of_a_grouped_user_model_keeps_equal_groups() -> None:
    """The union of two cuts' channels is topped up per group again, and the source needs no description."""
    model = GroupedNet().double().eval()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prof = modellego.profile(model, [(x, torch.arange(40) % 5)], select=False)
    comps = [modellego.disassemble(model, t, profile=prof) for t in ([1], [4])]  # a union of unequal groups
    merged = modellego.merge(model, comps)  # verify=True: equals the masked source on the merged channels
    groups = merged.get_submodule("grouped.0")
    assert get_info(merged).classes == (1, 4) and groups.groups > 1
    assert groups.out_channels >= max(c.get_submodule("grouped.0").out_channels for c in comps)
