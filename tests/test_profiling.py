"""The profiling pass: route maps against a hand computation of Eqs. 3-10; chunks, batches, class
subsets and the memory they may take; bad classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, locate_class
from modellego.errors import UserError

from helpers import GroupedNet, _depthwise_net, _perturbed_pair, tiny_sequential
from helpers import zoo_data as data
from helpers import zoo_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


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


@pytest.mark.parametrize("net", ["grouped", "depthwise"])
def test_a_chunk_located_in_one_walk_equals_each_class_located_alone(net: str) -> None:
    """Profiling walks a chunk's classes together (`locate_rows`); every row is `locate_class` of
    that class on its own contributions, for grouped and depthwise convolutions and a residual add."""
    model = (GroupedNet() if net == "grouped" else _depthwise_net()).double().eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(40) % 5
    prof = modellego.profile(model, [(x, y)], select=False, keep_contributions=True, class_chunk=3)
    graph = trace(model, x[:1])
    partial = 0
    for row, cls in enumerate(prof.classes):
        ins, outs = locate_class(graph, {k: v[row] for k, v in prof.contributions.items()}, cls, prof.thresholds)
        for k in prof.layers:
            assert torch.equal(prof.in_masks[k][row], ins[k]) and torch.equal(prof.out_masks[k][row], outs[k]), (cls, k)
            partial += int(0 < int(ins[k].sum()) < len(ins[k]))
    assert partial >= 5  # the thresholds cut somewhere: all-true masks would agree trivially


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


def test_profiling_holds_the_sums_of_as_many_classes_as_half_the_free_memory_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory for the sums of 4 classes: budget for 2, so 5 classes take 3 passes; the
    profile equals one pass over all classes."""
    import modellego
    import modellego.core.profiling as profiling

    source, _, _, images = _perturbed_pair()
    labels = [torch.arange(len(x)) % 5 for x in images]
    layers = trace(source, images[0][:1]).layers.values()
    per_class = 4 * sum(layer.out_features * layer.in_features for layer in layers)  # float32, no groups
    monkeypatch.setattr("modellego.memory.free_bytes", lambda device: 4 * per_class)
    passes: list[list[int]] = []
    real = profiling.contributions

    def counted(*args, **kwargs):
        passes.append(list(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(profiling, "contributions", counted)
    chunked = modellego.profile(source, list(zip(images, labels)), select=False)
    assert passes == [[0, 1], [2, 3], [4]]
    whole = modellego.profile(source, list(zip(images, labels)), select=False, memory_budget=5 * per_class)
    assert passes[3:] == [[0, 1, 2, 3, 4]]
    for k in whole.layers:
        assert torch.equal(chunked.in_masks[k], whole.in_masks[k]) and torch.equal(chunked.out_masks[k], whole.out_masks[k])
    with pytest.raises(UserError, match="memory_budget must be a number of bytes >= 0, got -1"):
        modellego.profile(source, list(zip(images, labels)), select=False, memory_budget=-1)
    with pytest.raises(UserError, match="class_chunk must be at least 1, got 0"):
        modellego.profile(source, list(zip(images, labels)), select=False, class_chunk=0)


def test_profile_rejects_bad_classes_and_unprofiled_classes() -> None:
    model = build("lenet5", 0.25)
    x, y = data()
    for classes, match in (([], "no classes"), ([0, 5], "out of range")):
        with pytest.raises(UserError, match=match):
            modellego.profile(model, [(x, y)], classes=classes, select=False)
    prof = modellego.profile(model, [(x, y)], classes=[0, 2], select=False)
    with pytest.raises(UserError, match="not profiled"):
        modellego.disassemble(model, [2, 3], profile=prof)
