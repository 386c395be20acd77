"""Component locating (Eqs. 5-10) and the graph rules: checked against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, keep_channels, locate_class, relevant_inputs, walk
from modellego.errors import UserError

from helpers import Ghost, GroupedNet, Shuffle, tiny_sequential

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def test_locate_flatten_maps_features_back_to_channels() -> None:
    model = tiny_sequential()
    graph = trace(model, torch.randn(1, 2, 8, 8, dtype=torch.float64))
    r = {"0": torch.zeros(3, 2, dtype=torch.float64), "2": torch.zeros(4, 3, dtype=torch.float64),
         "6": torch.zeros(3, 16, dtype=torch.float64)}
    r["6"][1, 6] = 1.0  # channel 1, position 2
    r["6"][1, 13] = 1.0  # channel 3, position 1
    r["6"][0, 0] = 1.0  # class 0 only: must not matter for class 1
    ins, outs = locate_class(graph, r, 1, Thresholds())
    assert outs["6"].tolist() == [False, True, False]
    assert torch.nonzero(ins["6"]).flatten().tolist() == [6, 13]
    assert outs["2"].tolist() == [False, True, False, True]
    # conv2 rows are all zeros: s = 0 everywhere, a constant zero vector keeps nothing
    assert not ins["2"].any() and not outs["0"].any()


def test_locate_thresholds_change_the_route() -> None:
    model = tiny_sequential()
    graph = trace(model, torch.randn(1, 2, 8, 8, dtype=torch.float64))
    r = {"0": torch.ones(3, 2, dtype=torch.float64), "2": torch.ones(4, 3, dtype=torch.float64),
         "6": torch.zeros(3, 16, dtype=torch.float64)}
    r["6"][2] = torch.linspace(0, 1, 16, dtype=torch.float64)
    # Eq. 9 with linear α=0.4: features with r >= 0.4 are relevant (one row, so s = r̂).
    ins, _ = locate_class(graph, r, 2, Thresholds())
    assert ins["6"].tolist() == (torch.linspace(0, 1, 16) >= 0.4).tolist()
    ins, _ = locate_class(graph, r, 2, Thresholds(linear_alpha=0.9))
    assert ins["6"].tolist() == (torch.linspace(0, 1, 16) >= 0.9).tolist()


def test_eq9_and_eq10_thresholds_are_inclusive() -> None:
    """r = α counts (Eq. 9) and r_p = β is relevant (Eq. 10)."""
    graph = trace(Depthwise(), torch.randn(1, 2, 5, 5))
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = {
        "fc": t([[1, 1, 1], [0, 0, 0]]),
        # 3 relevant rows; input 0 never >= α, input 1 once (exactly α), inputs 2 and 3 three times
        # -> s = [0, 1, 3, 3], min-max [0, 1/3, 1, 1]; β = 1/3 keeps input 1 exactly at the boundary
        "conv2": t([[0.29, 0.3, 1, 1], [0, 0, 1, 1], [0, 0, 0.3, 0.3]]),
        "dw": t([[1], [1], [1], [1]]),
        "conv1": t([[1, 0], [1, 0], [1, 0], [1, 0]]),
    }
    ins, _ = locate_class(graph, r, 0, Thresholds(conv_alpha=0.3, conv_beta=1 / 3))
    assert ins["conv2"].tolist() == [False, True, True, True]
    ins, _ = locate_class(graph, r, 0, Thresholds(conv_alpha=0.3, conv_beta=0.34))
    assert ins["conv2"].tolist() == [False, False, True, True]
    ins, _ = locate_class(graph, r, 0, Thresholds(conv_alpha=0.31, conv_beta=1 / 3))
    assert ins["conv2"].tolist() == [False, False, True, True]  # the 0.3 entries no longer count: s = [0, 0, 2, 2]


def test_minmax_by_hand_and_constant_vectors() -> None:
    from modellego.core.locate import minmax

    torch.testing.assert_close(minmax(torch.tensor([2, 4, 3, 2])), torch.tensor([0, 1, 0.5, 0], dtype=torch.float64))
    # Eq. 8 is 0/0 for a constant vector: a constant positive count keeps everything, zero nothing.
    assert minmax(torch.tensor([3, 3])).tolist() == [1.0, 1.0]
    assert minmax(torch.tensor([0, 0, 0])).tolist() == [0.0, 0.0, 0.0]


def test_single_input_layer_keeps_its_only_input() -> None:
    graph = trace(IdentitySkip(), torch.randn(1, 1, 5, 5))
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = {"fc": t([[1, 0, 0, 0], [0, 1, 0, 0]]), "conv1": torch.eye(4, dtype=torch.float64),
         "conv0": t([[1], [1], [1], [1]])}
    ins, outs = locate_class(graph, r, 1, Thresholds())
    assert outs["conv0"].tolist() == [False, True, False, False]
    assert ins["conv0"].tolist() == [True]  # s = [1]: constant and positive


# --- A share of each layer's inputs (locating under a FLOPs budget) ----------------------------


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


# --- Graph rules on small custom modules ---------------------------------------------------------


class AddCat(nn.Module):
    """h read by three convs; two of them are added; the sum is concatenated with the third."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.conv_c = nn.Conv2d(4, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv0(x))
        s = self.conv_a(h) + self.conv_b(h)
        z = torch.cat([s, self.conv_c(h)], 1)
        return self.fc(torch.flatten(self.pool(z), 1))


def addcat_contributions() -> dict[str, torch.Tensor]:
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return {
        # class 1 reads fc inputs 0, 3 (from the add) and 5 (conv_c's channel 1); class 0's row is ignored
        "fc": t([[0, 1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 1, 0]]),
        # relevant outputs 0 and 3 read input 0; irrelevant rows point at input 2 (output gating)
        "conv_a": t([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]]),
        "conv_b": t([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0]]),
        # conv_c's relevant outputs are 0 and 2 (cat offset 4: features 4 and 6)
        "conv_c": t([[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]),
        # rows 0-2 relevant: s = [3, 1] -> min-max [1, 0] -> input 1 passes α once but fails β
        "conv0": t([[1, 0], [1, 0], [0.5, 1], [0, 1]]),
    }


def test_add_and_cat_rules_by_hand() -> None:
    graph = trace(AddCat(), torch.randn(1, 2, 6, 6))
    ins, outs = locate_class(graph, addcat_contributions(), 1, Thresholds())
    assert ins["fc"].tolist() == [True, False, False, True, False, True, False]
    # cat splits by offsets: features 0-3 come from the add, 4-6 from conv_c
    assert outs["conv_c"].tolist() == [False, True, False]
    # an add passes its relevance to both addends
    assert outs["conv_a"].tolist() == [True, False, False, True]
    assert outs["conv_b"].tolist() == [True, False, False, True]
    # gating: irrelevant outputs' contributions do not count
    assert ins["conv_a"].tolist() == [True, False, False, False]
    assert ins["conv_b"].tolist() == [False, True, False, False]
    assert ins["conv_c"].tolist() == [False, False, True, False]
    # h has three readers: relevant where ANY of them needs it
    assert outs["conv0"].tolist() == [True, True, True, False]
    assert ins["conv0"].tolist() == [True, False]


def test_add_and_cat_keep_channels() -> None:
    graph = trace(AddCat(), torch.randn(1, 2, 6, 6))
    ins, _ = locate_class(graph, addcat_contributions(), 1, Thresholds())
    keep = keep_channels(graph, ins, [1])
    space = lambda name: graph.segments(graph.layers[name].node)[0].space  # noqa: E731
    assert space("conv_a") == space("conv_b")  # the add merged their channel spaces
    assert keep[space("conv_a")] == [0, 3]
    assert keep[space("conv_c")] == [1]
    assert keep[space("conv0")] == [0, 1, 2]
    assert keep[space("fc")] == [1]
    assert keep[graph.segments(graph.layers["conv0"].input)[0].space] == [0, 1]  # the image keeps all


def test_add_rule_through_profile_reaches_both_addends() -> None:
    """With real data: every relevant output of the add is relevant for both convolutions."""
    torch.manual_seed(1)
    model = AddCat().eval()
    x, y = torch.randn(10, 2, 6, 6), torch.arange(10) % 2
    prof = modellego.profile(model, [(x, y)], select=False)
    for c in range(2):
        assert torch.equal(prof.out_masks["conv_a"][c], prof.out_masks["conv_b"][c])
        assert torch.equal(prof.out_masks["conv_a"][c], prof.in_masks["fc"][c][:4])
        assert torch.equal(prof.out_masks["conv_c"][c], prof.in_masks["fc"][c][4:])
        union = prof.in_masks["conv_a"][c] | prof.in_masks["conv_b"][c] | prof.in_masks["conv_c"][c]
        assert torch.equal(prof.out_masks["conv0"][c], union)


class IdentitySkip(nn.Module):
    """h is read by a conv and by the identity branch of a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv0(x))
        y = self.conv1(h) + h
        return self.fc(self.pool(y).flatten(1))


def test_multi_consumer_tensor_gets_the_or() -> None:
    graph = trace(IdentitySkip(), torch.randn(1, 1, 5, 5))
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = {
        "fc": t([[1, 0, 0, 0], [0, 0, 0, 0]]),  # class 0 needs add output channel 0 only
        "conv1": t([[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]),  # output 0 reads input 2
        "conv0": t([[1], [1], [1], [1]]),
    }
    ins, outs = locate_class(graph, r, 0, Thresholds())
    assert outs["conv1"].tolist() == [True, False, False, False]
    assert ins["conv1"].tolist() == [False, False, True, False]
    # h: channel 0 through the identity, channel 2 through conv1
    assert outs["conv0"].tolist() == [True, False, True, False]


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.conv2(self.act(self.dw(self.conv1(x)))))))


def test_depthwise_couples_input_to_output() -> None:
    graph = trace(Depthwise(), torch.randn(1, 2, 5, 5))
    assert graph.layers["dw"].depthwise and not graph.layers["conv2"].depthwise
    assert graph.segments(graph.layers["dw"].node) == graph.segments(graph.layers["dw"].input)
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = {
        "fc": t([[1, 1, 0], [0, 0, 1]]),
        "conv2": t([[0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]),
        # Shape (Q, 1); if treated like a normal conv every relevant row would keep "input 0"
        "dw": t([[1], [1], [0], [1]]),
        "conv1": t([[1, 0], [1, 0], [1, 0], [1, 0]]),
    }
    ins, outs = locate_class(graph, r, 0, Thresholds())
    assert outs["conv2"].tolist() == [True, True, False]
    assert ins["conv2"].tolist() == [False, True, True, False]
    assert outs["dw"].tolist() == [False, True, True, False]
    assert ins["dw"].tolist() == [False, True, True, False]
    assert outs["conv1"].tolist() == [False, True, True, False]
    # through profile as well: the depthwise layer's in and out masks are equal for every class
    torch.manual_seed(0)
    model = Depthwise().eval()
    prof = modellego.profile(model, [(torch.randn(8, 2, 5, 5), torch.arange(8) % 2)], select=False)
    assert prof.in_masks["dw"].shape == (2, 4)
    assert torch.equal(prof.in_masks["dw"], prof.out_masks["dw"])
    assert torch.equal(prof.out_masks["dw"], prof.in_masks["conv2"])


class Gated(nn.Module):
    """A squeeze-and-excitation gate (B, C, 1, 1) scales h channel by channel, then scalar arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.reduce = nn.Conv2d(4, 2, 1)
        self.expand = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv0(x))
        g = F.hardsigmoid(self.expand(torch.relu(self.reduce(torch.mean(h, (2, 3), keepdim=True)))))
        z = (h * g) / 2 - 0.5  # a product, then a division and subtraction by numbers
        return self.fc(z.mean((-2, -1)))


def test_product_passes_relevance_to_both_factors_and_merges_their_channels() -> None:
    graph = trace(Gated(), torch.randn(1, 2, 5, 5))
    space = lambda name: graph.segments(graph.layers[name].node)[0].space  # noqa: E731
    assert space("expand") == space("conv0")  # channel c of the gate scales channel c of h
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    r = {
        "fc": t([[0, 1, 1, 0], [1, 0, 0, 1]]),  # class 0 needs product channels 1 and 2
        "expand": t([[1, 0], [0, 1], [0, 1], [1, 0]]),  # gate channels 1 and 2 read squeezed channel 1
        "reduce": t([[0, 0, 0, 1], [0, 0, 0, 1]]),  # the squeeze reads h's channel 3 only
        "conv0": t([[1, 0], [1, 0], [1, 0], [1, 0]]),
    }
    ins, outs = locate_class(graph, r, 0, Thresholds())
    assert outs["expand"].tolist() == [False, True, True, False]  # the gate's factor
    assert ins["expand"].tolist() == [False, True]
    assert outs["reduce"].tolist() == [False, True]
    assert ins["reduce"].tolist() == [False, False, False, True]
    # h is read by the product (channels 1, 2) and, through the mean, by the squeeze (channel 3)
    assert outs["conv0"].tolist() == [False, True, True, True]
    keep = keep_channels(graph, ins, [0])
    assert keep[space("conv0")] == [1, 2, 3]  # what the squeeze reads is kept for the gate as well
    assert keep[space("reduce")] == [1]


class ExpandAsOther(nn.Module):
    """A (B, C) gate expanded to the shape of a map it does not scale: that map gives only a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 4, 3, padding=1)
        self.gate = nn.Linear(2, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x.mean((2, 3)))).unsqueeze(2).unsqueeze(3)  # (B, 4, 1, 1)
        y = self.conv_a(x) * g.expand_as(self.conv_b(x))
        return self.fc(y.mean((2, 3)))


def test_expand_as_passes_no_relevance_to_the_tensor_it_reads_for_its_shape() -> None:
    graph = trace(ExpandAsOther(), torch.randn(1, 2, 5, 5))
    r = {name: torch.ones(layer.out_features, layer.in_features, dtype=torch.float64)
         for name, layer in graph.layers.items()}
    r["fc"] = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    ins, outs = locate_class(graph, r, 0, Thresholds())
    assert ins["fc"].tolist() == [True, False, True, False]
    assert outs["conv_a"].tolist() == outs["gate"].tolist() == [True, False, True, False]
    assert not outs["conv_b"].any()  # no relevance, so conv_b's inputs are not kept for it
    # but conv_b keeps the channels the gate keeps, or the component's expand_as would fail
    space = lambda name: graph.segments(graph.layers[name].node)[0].space  # noqa: E731
    assert space("conv_b") == space("conv_a") == space("gate")


# --- Thresholds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["conv_alpha", "conv_beta", "linear_alpha", "linear_beta"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.0001, 2.0, math.nan])
def test_thresholds_outside_unit_interval_raise(field: str, value: float) -> None:
    with pytest.raises(UserError, match=field):
        Thresholds(**{field: value})


def test_thresholds_accept_the_boundary_and_defaults() -> None:
    th = Thresholds(1.0, 1.0, 1.0, 1.0)
    assert th.to_json() == {"conv_alpha": 1.0, "conv_beta": 1.0, "linear_alpha": 1.0, "linear_beta": 1.0}
    assert Thresholds().to_json() == {"conv_alpha": 0.3, "conv_beta": 0.2, "linear_alpha": 0.4, "linear_beta": 0.3}


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(self.conv1(x)).mean((2, 3)))


def test_a_grouped_input_counts_the_votes_of_its_own_group_only() -> None:
    graph = trace(Grouped(), torch.randn(1, 2, 5, 5))
    assert graph.layers["grouped"].grouped and graph.layers["grouped"].groups == 2
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    # Output 0 and 1 read inputs 0-1, outputs 2 and 3 read inputs 2-3 (r is (Q, P / groups)).
    r = {"fc": t([[1, 1, 1, 1], [0, 0, 0, 0]]),
         "grouped": t([[1, 0], [1, 0], [0, 1], [1, 1]]),
         "conv1": t([[1, 0], [1, 0], [1, 0], [1, 0]])}
    ins, _ = locate_class(graph, r, 0, Thresholds())
    # Eq. 6 counts per input: 2, 0 (group 0), 1, 2 (group 1); min-max 1, 0, 0.5, 1 against β = 0.2.
    assert ins["grouped"].tolist() == [True, False, True, True]


def test_keep_channels_gives_every_kept_group_the_same_counts() -> None:
    graph = trace(GroupedNet(), torch.randn(1, 1, 8, 8))
    none = {name: torch.zeros(layer.in_features, dtype=torch.bool) for name, layer in graph.layers.items()}

    def mask(n: int, on: list[int]) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[on] = True
        return m

    # The grouped 3×3 (4 groups) reads 16 channels, 4 per group; its 12 outputs are 3 per group.
    ins = {**none, "fc": mask(8, [0, 1]), "expand": mask(12, [0, 4, 5]), "grouped.0": mask(16, [0, 1, 5, 12]),
           "reduce.0": mask(8, [0]), "down": mask(8, [0])}
    keep = keep_channels(graph, ins, [0, 1], warn=False)
    space_in = graph.segments(graph.layers["grouped.0"].input)[0].space
    space_out = graph.segments(graph.layers["grouped.0"].node)[0].space
    # Groups 0, 1 and 3 are used (group 3 on the input side only); group 2 nowhere, so it is dropped.
    assert keep[space_in] == [0, 1, 4, 5, 12, 13]
    assert keep[space_out] == [0, 1, 4, 5, 9, 10]


def test_slices_and_shuffles_map_relevance_back_by_offset_and_permutation() -> None:
    def only(on: dict[str, list[int]]):
        def rule(layer, mask):  # the layer's inputs listed in `on` are relevant, nothing else
            m = torch.zeros(layer.in_features, dtype=torch.bool)
            m[on.get(layer.name, [])] = True
            return m
        return rule

    start = torch.ones(5, dtype=torch.bool)
    # Ghost: fc reads channel 6 of cat([p, cheap(p)])[:, :7] + short(x): cheap's output 2, short's output 6.
    _, outs = walk(trace(Ghost(), torch.randn(1, 3, 6, 6)), start, only({"fc": [6]}))
    assert outs["cheap"].tolist() == [False, False, True, False]
    assert outs["short"].tolist() == [False] * 6 + [True]
    # Shuffle of 8 channels in 2 groups: position j holds channel [0, 4, 1, 5, 2, 6, 3, 7][j], so the
    # head's input 1 is channel 4 of cat([a, branch(b)]): the branch's output 0.
    _, outs = walk(trace(Shuffle(), torch.randn(1, 3, 6, 6)), start, only({"fc": list(range(6)), "head": [1]}))
    assert outs["branch"].tolist() == [True, False, False, False]
    assert not outs["stem"].any()
