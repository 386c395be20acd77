"""Component locating (Eqs. 5-10) and the graph rules: checked against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, keep_channels, locate_class
from modellego.errors import UnsupportedGraphError, UserError

# --- Hand computation of Eqs. 3-10 (numpy / plain torch ops, no library code) -----------------


def hand_conv_s(conv: nn.Conv2d, a: torch.Tensor) -> np.ndarray:
    """s[b, q, p] = Σ_hw (c_{q,p} ⊗ a_p): one single-channel convolution per (q, p)."""
    out = np.zeros((a.shape[0], conv.out_channels, conv.in_channels))
    for q in range(conv.out_channels):
        for p in range(conv.in_channels):
            k = conv.weight[q, p][None, None]
            hidden = F.conv2d(a[:, p: p + 1], k, None, conv.stride, conv.padding, conv.dilation)
            out[:, q, p] = hidden.sum((1, 2, 3)).numpy()
    return out


def hand_linear_s(fc: nn.Linear, a: torch.Tensor) -> np.ndarray:
    w, x = fc.weight.detach().numpy(), a.numpy()
    out = np.zeros((x.shape[0],) + w.shape)
    for b in range(x.shape[0]):
        for q in range(w.shape[0]):
            for p in range(w.shape[1]):
                out[b, q, p] = w[q, p] * x[b, p]
    return out


def hand_s_hat(s: np.ndarray, mode: str) -> np.ndarray:
    if mode == "sample":
        return np.maximum(s, 0).sum(0)  # ReLU per sample, then sum
    return np.maximum(s.sum(0), 0)  # s is linear in a: s(Σ a) = Σ s(a); then ReLU


def hand_relative(s_hat: np.ndarray) -> np.ndarray:
    lo = s_hat.min(1, keepdims=True)
    hi = s_hat.max(1, keepdims=True)
    return (s_hat - lo) / (hi - lo + 1e-5)


def hand_minmax(v: np.ndarray) -> np.ndarray:
    lo, hi = v.min(), v.max()
    if hi == lo:  # the library's convention: a constant positive vector is all ones
        return (v > 0).astype(float)
    return (v - lo) / (hi - lo)


def hand_locate(r: np.ndarray, out_mask: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    r_hat = np.zeros_like(r)
    for q in range(r.shape[0]):
        for p in range(r.shape[1]):
            r_hat[q, p] = 1.0 if (r[q, p] >= alpha and out_mask[q]) else 0.0  # Eq. 9 (gated)
    s = r_hat.sum(0)  # Eq. 6
    return hand_minmax(s) >= beta  # Eqs. 8, 10


def tiny_sequential() -> nn.Sequential:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():
        for m in (model[0], model[2], model[6]):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return model.eval()


def hand_route(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, cls: int, mode: str):
    conv1, conv2, fc = model[0], model[2], model[6]
    with torch.no_grad():
        a0 = x[y == cls]
        a1 = torch.relu(conv1(a0))
        a2 = torch.relu(conv2(a1))
        a3 = F.adaptive_avg_pool2d(a2, 2).reshape(len(a0), -1)
        r1 = hand_relative(hand_s_hat(hand_conv_s(conv1, a0), mode))
        r2 = hand_relative(hand_s_hat(hand_conv_s(conv2, a1), mode))
        r3 = hand_relative(hand_s_hat(hand_linear_s(fc, a3), mode))
    out3 = np.arange(3) == cls
    in3 = hand_locate(r3, out3, 0.4, 0.3)  # (16,) features, channel-major: c * 4 + position
    out2 = in3.reshape(4, 4).any(1)  # a channel is relevant if any of its positions is
    in2 = hand_locate(r2, out2, 0.3, 0.2)
    out1 = in2
    in1 = hand_locate(r1, out1, 0.3, 0.2)
    return {"0": (in1, out1), "2": (in2, out2), "6": (in3, out3)}, {"0": r1, "2": r2, "6": r3}


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_profile_masks_match_hand_computation(mode: str) -> None:
    model = tiny_sequential()
    torch.manual_seed(0)
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64)
    y = torch.arange(12) % 3
    prof = modellego.profile(model, [(x[:5], y[:5]), (x[5:], y[5:])], select=False, mode=mode)
    assert prof.classes == (0, 1, 2)
    assert prof.layers == ["0", "2", "6"]
    graph = trace(model, x[:1])
    nontrivial = 0
    for cls in range(3):
        want, r = hand_route(model, x, y, cls, mode)
        ins, outs = locate_class(graph, {k: torch.from_numpy(v) for k, v in r.items()}, cls, Thresholds())
        for name, (w_in, w_out) in want.items():
            assert prof.in_masks[name][cls].tolist() == w_in.tolist(), (cls, name)
            assert prof.out_masks[name][cls].tolist() == w_out.tolist(), (cls, name)
            assert ins[name].tolist() == w_in.tolist() and outs[name].tolist() == w_out.tolist()
            nontrivial += int(0 < w_in.sum() < len(w_in))
    # The example must exercise the thresholds: some masks keep part of a layer only.
    assert nontrivial >= 3


def test_profile_chunking_batching_and_class_subsets_agree() -> None:
    """Classes are located independently: chunks, batch sizes and subsets give the same rows."""
    model = tiny_sequential()
    torch.manual_seed(0)
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64)
    y = torch.arange(12) % 3
    ref = modellego.profile(model, [(x, y)], select=False)
    variants = [
        modellego.profile(model, [(x, y)], select=False, class_chunk=1, batch_size=5),
        modellego.profile(model, [(x[:7], y[:7]), (x[7:], y[7:])], select=False, class_chunk=2, batch_size=2),
    ]
    for prof in variants:
        for k in ref.layers:
            assert torch.equal(prof.in_masks[k], ref.in_masks[k]) and torch.equal(prof.out_masks[k], ref.out_masks[k])
    sub = modellego.profile(model, [(x, y)], classes=[2, 0], select=False)
    assert sub.classes == (2, 0)
    for k in ref.layers:
        assert torch.equal(sub.in_masks[k], ref.in_masks[k][[2, 0]])
    assert torch.equal(sub.task_in_masks([0, 2])["2"], ref.in_masks["2"][[0, 2]].any(0))


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


# --- Thresholds and unsupported graphs -----------------------------------------------------------


@pytest.mark.parametrize("field", ["conv_alpha", "conv_beta", "linear_alpha", "linear_beta"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.0001, 2.0, math.nan])
def test_thresholds_outside_unit_interval_raise(field: str, value: float) -> None:
    with pytest.raises(UserError, match=field):
        Thresholds(**{field: value})


def test_thresholds_accept_the_boundary_and_defaults() -> None:
    th = Thresholds(1.0, 1.0, 1.0, 1.0)
    assert th.to_json() == {"conv_alpha": 1.0, "conv_beta": 1.0, "linear_alpha": 1.0, "linear_beta": 1.0}
    assert Thresholds().to_json() == {"conv_alpha": 0.3, "conv_beta": 0.2, "linear_alpha": 0.4, "linear_beta": 0.3}


class ScalarGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(x.mean())
        return self.fc(x.mean((2, 3)))


class SpatialGate(nn.Module):
    """A (B, 1, H, W) map scales every channel: channel c of the product reads channel 0 of the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.att = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(self.att(x))  # (B, 3, H, W) * (B, 1, H, W)
        return self.fc(x.mean((2, 3)))


class SpatialGateExpanded(SpatialGate):
    """The same gate broadcast over the channels by `expand_as` before the product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(self.att(x)).expand_as(x)  # (B, 1, H, W) -> (B, 3, H, W)
        return self.fc(x.mean((2, 3)))


class ChannelUnsqueeze(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)).unsqueeze(1).flatten(1))  # (B, 3) -> (B, 1, 3)


class LogSoftmaxHead(nn.Module):
    """PyTorch's MNIST example ends with log_softmax, for NLLLoss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.conv(x).mean((2, 3))), dim=1)


class Difference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3)
        self.conv_b = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv_a(x) - self.conv_b(x)).mean((2, 3)))


class ChannelMean(nn.Module):
    """A mean over the channels of a (B, 3, 3, 3) map keeps the shape's first two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.mean(self.conv(x), 1).flatten(1))


class MatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(torch.matmul(x, x).flatten(1))


class Recurrent(nn.Module):
    """Input (B, T, F) read as (B, C, L); an LSTM returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class CatSpatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(torch.cat([x, x], 2).mean((2, 3)))


UNSUPPORTED = [
    (ScalarGate, (1, 2, 5, 5), "'mean'"),
    (SpatialGate, (1, 2, 5, 5), "'mul'"),
    (SpatialGateExpanded, (1, 2, 5, 5), "'expand_as'"),
    (ChannelUnsqueeze, (1, 2, 5, 5), "'unsqueeze'"),
    (Difference, (1, 2, 5, 5), "'sub'"),
    (LogSoftmaxHead, (1, 2, 5, 5), "return the logits instead"),
    (ChannelMean, (1, 2, 5, 5), "'mean'"),
    (MatMul, (1, 2, 4, 4), "'matmul'"),
    (Recurrent, (1, 3, 4), "'lstm'"),
    (SharedConv, (1, 2, 4, 4), "'conv_1'"),
    (Grouped, (1, 2, 5, 5), "groups=2"),
    (CatSpatial, (1, 2, 3, 3), "'cat'"),
]


@pytest.mark.parametrize("cls,shape,node", UNSUPPORTED, ids=[u[0].__name__ for u in UNSUPPORTED])
def test_unsupported_ops_raise_naming_the_node(cls: type, shape: tuple, node: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(UnsupportedGraphError) as info:
        trace(cls(), torch.randn(*shape))
    assert node in str(info.value)
    assert "cannot follow channels through node" in str(info.value)


def test_unsupported_op_raises_from_profile_too() -> None:
    model = SpatialGate()
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UnsupportedGraphError, match="'mul'"):
        modellego.profile(model, [(x, y)], select=False)
    # and the failure left no hooks behind
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_untraceable_model_raises_unsupported_graph_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.fc(x)

    with pytest.raises(UnsupportedGraphError, match="Branchy"):
        trace(Branchy(), torch.randn(1, 3))
