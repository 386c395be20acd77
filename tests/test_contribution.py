"""Relative contributions (Eqs. 3-5): the fast paths against the formula as written."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modellego.core import contribution as contrib
from modellego.core.contribution import (
    EPS,
    class_slots,
    conv_contribution,
    linear_contribution,
    literal_contribution,
    make_accumulator,
    relative,
    window_sums,
)

from helpers import ACC_LAYERS, _feed, _inputs, make_conv

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# (name, Conv2d kwargs). in_channels defaults to 4, out_channels to 6, kernel_size to 3.
CONV_CASES = [
    ("plain", {}),
    ("strided", {"stride": 2}),
    ("padded", {"padding": 1}),
    ("dilated", {"dilation": 2}),
    ("dilated_padded_strided", {"dilation": 2, "padding": 2, "stride": 2}),
    ("asymmetric_kernel", {"kernel_size": (3, 5), "padding": (1, 2)}),
    ("asymmetric_stride", {"kernel_size": (3, 5), "stride": (2, 1)}),
    ("same", {"padding": "same"}),
    ("same_even_kernel", {"kernel_size": 4, "padding": "same"}),
    ("same_dilated", {"kernel_size": (2, 3), "padding": "same", "dilation": 2}),
    ("valid", {"padding": "valid"}),
    ("reflect", {"padding": 1, "padding_mode": "reflect"}),
    ("replicate", {"padding": 2, "padding_mode": "replicate", "stride": 2}),
    ("circular", {"padding": 1, "padding_mode": "circular"}),
    ("grouped", {"groups": 2, "out_channels": 8}),
    ("depthwise", {"groups": 4, "out_channels": 4, "padding": 1}),
    ("depthwise_multiplier", {"groups": 4, "out_channels": 8, "stride": 2}),
    ("one_by_one", {"kernel_size": 1}),
]


def brute_force(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """s[b, q, p]: a 1-in/1-out copy of `m` (same padding, mode, stride, dilation) per (q, p) pair."""
    g = m.groups
    qg, pg = m.out_channels // g, m.in_channels // g
    s = torch.zeros(x.shape[0], m.out_channels, pg, dtype=x.dtype)
    for q in range(m.out_channels):
        group = q // qg
        for p in range(pg):
            single = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, m.dilation, bias=False,
                               padding_mode=m.padding_mode).double()
            with torch.no_grad():
                single.weight.copy_(m.weight[q, p][None, None])
                a_p = x[:, group * pg + p][:, None]
                s[:, q, p] = single(a_p).sum((1, 2, 3))
    return s


@pytest.mark.parametrize("form", ["separable", "kron"])  # the two forms of window_sums
@pytest.mark.parametrize("kwargs", [c[1] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_conv_contribution_matches_literal_and_brute_force(monkeypatch: pytest.MonkeyPatch, kwargs: dict,
                                                           form: str) -> None:
    monkeypatch.setattr(contrib, "KRON_PIXELS", 0 if form == "separable" else 10_000)
    m = make_conv(kwargs)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64)
    fast = conv_contribution(m, x)
    literal = literal_contribution(m, x)
    g = m.groups
    assert fast.shape == (3, m.out_channels, 4 // g)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast, brute_force(m, x), rtol=0, atol=1e-10)
    # Σ_p s_{q,p} is the output map summed over positions, minus the bias: ties s to the module itself.
    with torch.no_grad():
        y = m(x)
    per_filter = y.sum((2, 3)) - m.bias * y.shape[2] * y.shape[3]
    torch.testing.assert_close(fast.sum(2), per_filter.detach(), rtol=0, atol=1e-10)


def _smallest_map(m: nn.Conv2d) -> torch.Tensor:
    """The smallest square input on which `m` runs: most geometries then take the pixel form."""
    for size in range(1, 8):
        x = torch.randn(3, m.in_channels, size, size, dtype=torch.float64)
        try:
            m(x)
        except RuntimeError:
            continue
        return x
    raise AssertionError("no input size found")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_contribution_on_small_maps_matches_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps of at most K pixels fold the touch matrix into the weight (contraction over pixels)."""
    window_calls: list[int] = []
    window_sums_ = contrib._window_sums
    monkeypatch.setattr(contrib, "_window_sums", lambda *a: window_calls.append(1) or window_sums_(*a))
    for name, kwargs in CONV_CASES:
        m = make_conv(kwargs)
        torch.manual_seed(1)
        x = _smallest_map(m)
        u, w = contrib.contraction_operands(m, x)
        assert w.shape == (m.in_channels, u.shape[2], m.out_channels // m.groups), name
        torch.testing.assert_close(conv_contribution(m, x), literal_contribution(m, x), rtol=0, atol=1e-10,
                                   msg=name)
    # Two calls per geometry (operands, then conv_contribution) that did not fold.
    assert len(CONV_CASES) - len(window_calls) // 2 >= 10  # not vacuous: most geometries took the pixel form


def test_folded_weight_is_memoised_until_the_weight_changes() -> None:
    m = make_conv({"padding": 1})
    x = _inputs("conv_tiny_map", 4)
    folded: dict = {}
    _, first = contrib.contraction_operands(m, x, folded)
    _, again = contrib.contraction_operands(m, x, folded)
    assert again is first  # reused, not refolded
    with torch.no_grad():
        m.weight.mul_(2)  # an in-place edit bumps the weight's version
    _, edited = contrib.contraction_operands(m, x, folded)
    torch.testing.assert_close(edited, 2 * first, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv_contribution(m, x), literal_contribution(m, x), rtol=0, atol=1e-10)


def test_class_order_is_shared_within_a_batch_only() -> None:
    ws = contrib.Workspace()
    slots = torch.tensor([1, 0, 1, 2, 0])
    first = ws.class_order(slots, 4)
    order, starts = first
    assert torch.equal(slots[order], torch.tensor([0, 0, 1, 1, 2])) and starts.tolist() == [0, 2, 4, 5, 5]
    assert ws.class_order(slots, 4) is first  # the next layer of the same batch
    assert ws.class_order(slots.clone(), 4) is not first  # another batch, even with equal labels
    slots[3] = 0  # an in-place edit bumps the version
    assert ws.class_order(slots, 4)[1].tolist() == [0, 3, 5, 5, 5]


def test_window_sums_by_hand() -> None:
    # 1x1 input channel, 2x2 kernel, stride 1, no padding over a 3x3 image: each kernel offset
    # touches a 2x2 block of the image.
    m = nn.Conv2d(1, 1, 2, bias=False).double()
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    u = window_sums(m, x)
    want = torch.tensor([[[0 + 1 + 3 + 4, 1 + 2 + 4 + 5, 3 + 4 + 6 + 7, 4 + 5 + 7 + 8]]], dtype=torch.float64)
    assert torch.equal(u, want)


def test_linear_contribution_by_hand() -> None:
    torch.manual_seed(0)
    m = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    s = linear_contribution(m, x)
    assert s.shape == (4, 3, 5)
    for b in range(4):
        for q in range(3):
            for p in range(5):
                assert s[b, q, p].item() == pytest.approx((m.weight[q, p] * x[b, p]).item(), abs=1e-12)
    torch.testing.assert_close(literal_contribution(m, x), s, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.sum(2) + m.bias, m(x).detach(), rtol=0, atol=1e-10)


def test_literal_contribution_float32_matches_float64() -> None:
    m = make_conv({"padding": 1, "stride": 2})
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    m32 = make_conv({"padding": 1, "stride": 2}).float()
    s32 = conv_contribution(m32, x.float())
    torch.testing.assert_close(s32.double(), conv_contribution(m, x), rtol=1e-4, atol=1e-4)


# --- LayerAccumulator -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sample", "mean"])
@pytest.mark.parametrize("kind", list(ACC_LAYERS))
def test_accumulator_streaming_equals_one_batch(kind: str, mode: str) -> None:
    torch.manual_seed(3)
    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 11)
    slots = torch.tensor([0, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2])
    one, many = make_accumulator(m, 3, mode), make_accumulator(m, 3, mode)
    one.update(x, slots)
    _feed(many, x, slots, [1, 4, 2, 4])
    for slot in range(3):
        torch.testing.assert_close(many.s_hat(slot), one.s_hat(slot), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", list(ACC_LAYERS))
def test_accumulator_matches_literal_definitions(kind: str) -> None:
    """ŝ in "sample" mode is Σ_b ReLU(s_b); in "mean" mode ReLU(s of Σ_b a_b) (= ReLU(Σ_b s_b))."""
    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 9)
    slots = torch.tensor([1, 0, 1, 1, 0, 2, 0, 1, 0])
    sample, mean = make_accumulator(m, 3, "sample"), make_accumulator(m, 3, "mean")
    sample.update(x, slots)
    mean.update(x, slots)
    s = literal_contribution(m, x)  # (B, Q, Pg)
    for slot in range(3):
        sel = s[slots == slot]
        torch.testing.assert_close(sample.s_hat(slot), sel.clamp(min=0).sum(0), rtol=0, atol=1e-10)
        summed = x[slots == slot].sum(0, keepdim=True)
        torch.testing.assert_close(mean.s_hat(slot), literal_contribution(m, summed)[0].clamp(min=0), rtol=0, atol=1e-10)
        torch.testing.assert_close(mean.s_hat(slot), sel.sum(0).clamp(min=0), rtol=0, atol=1e-10)
    # The two modes really differ (so the test above would notice a swapped mode).
    assert not torch.allclose(sample.s_hat(0), mean.s_hat(0))


def test_linear_sample_mode_factorisation_is_literal_relu_then_sum() -> None:
    torch.manual_seed(4)
    m = nn.Linear(7, 5).double()
    x = torch.randn(13, 7, dtype=torch.float64)
    slots = torch.zeros(13, dtype=torch.long)
    acc = make_accumulator(m, 1, "sample")
    acc.update(x, slots)
    # Kept state is O(P): only Σ a⁺ and Σ a⁻.
    assert set(acc.state) == {"pos", "neg"} and acc.state["pos"].shape == (1, 7)
    w = m.weight.detach()
    literal = torch.zeros(5, 7, dtype=torch.float64)
    for b in range(13):
        for q in range(5):
            for p in range(7):
                literal[q, p] += max(w[q, p].item() * x[b, p].item(), 0.0)
    factorised = w.clamp(min=0) * x.clamp(min=0).sum(0) + (-w).clamp(min=0) * (-x).clamp(min=0).sum(0)
    torch.testing.assert_close(factorised, literal, rtol=0, atol=1e-10)
    torch.testing.assert_close(acc.s_hat(0), literal, rtol=0, atol=1e-10)


def test_pointwise_conv_keeps_o_p_state_per_class() -> None:
    m = ACC_LAYERS["pointwise_strided_grouped"]()
    acc = make_accumulator(m, 3, "sample")
    acc.update(_inputs("conv", 5), torch.tensor([0, 1, 2, 2, 0]))
    assert set(acc.state) == {"pos", "neg"} and acc.state["pos"].shape == (3, 4)  # (C, P), never (P, C, Qg)


def test_conv_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    m = make_conv({"padding": 1})
    x = _inputs("conv", 10)
    slots = torch.tensor([0, 1] * 5)
    whole = make_accumulator(m, 2, "sample")
    whole.update(x, slots)
    monkeypatch.setattr(contrib, "CHUNK_ELEMENTS", m.out_channels * m.in_channels * 3)  # 3 samples a chunk
    chunked = make_accumulator(m, 2, "sample")
    chunked.update(x, slots)
    for slot in range(2):
        torch.testing.assert_close(chunked.s_hat(slot), whole.s_hat(slot), rtol=0, atol=1e-10)


@pytest.mark.parametrize("fold", [False, True])  # window sums, or the weight folded over the pixels
@pytest.mark.parametrize("samples_per_block", [1, 3, 100])
def test_depthwise_accumulator_matches_literal(monkeypatch: pytest.MonkeyPatch, fold: bool,
                                               samples_per_block: int) -> None:
    """One filter per input channel: a (B, P) block per chunk of samples, summed by class."""
    m = ACC_LAYERS["depthwise"]()
    x = _inputs("depthwise", 10)  # (10, 4, 7, 6)
    slots = torch.tensor([0, 2, 2, 1, 0, 1, 1, 2, 0, 0])
    monkeypatch.setattr(contrib, "KRON_PIXELS", 10_000 if fold else 0)
    monkeypatch.setattr(contrib, "CHUNK_ELEMENTS", samples_per_block * m.in_channels * (42 if fold else 9))
    u, _ = contrib.contraction_operands(m, x)
    assert u.shape[2] == (42 if fold else 9)  # j runs over the 7×6 pixels, or over the 3×3 offsets
    acc = make_accumulator(m, 3, "sample")
    acc.update(x, slots)
    s = literal_contribution(m, x).clamp(min=0)  # (B, Q, 1)
    for slot in range(3):
        torch.testing.assert_close(acc.s_hat(slot), s[slots == slot].sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("slice_runs", [0, 64])  # 0: every chunk is summed by the one-hot matmul
@pytest.mark.parametrize("tile", [1, 20])  # tiles of one input channel, or one tile for all
@pytest.mark.parametrize("kind", ["conv", "grouped", "conv_tiny_map"])
def test_cpu_tiles_and_both_class_sums_match_literal(monkeypatch: pytest.MonkeyPatch, kind: str, tile: int,
                                                     slice_runs: int) -> None:
    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 10)
    slots = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 1, 0])  # class runs, one class split in two
    monkeypatch.setattr(contrib, "TILE_ELEMENTS", tile * m.out_channels // m.groups * 3)  # 3 samples a chunk
    monkeypatch.setattr(contrib, "CHUNK_ELEMENTS", m.out_channels * m.in_channels // m.groups * 3)
    monkeypatch.setattr(contrib, "SLICE_RUNS", slice_runs)
    acc = make_accumulator(m, 3, "sample")
    acc.update(x, slots)
    s = literal_contribution(m, x).clamp(min=0)  # (B, Q, Pg)
    for slot in range(3):
        torch.testing.assert_close(acc.s_hat(slot), s[slots == slot].sum(0), rtol=0, atol=1e-10)


def test_layers_sharing_a_workspace_equal_layers_with_their_own() -> None:
    convs = [make_conv({"padding": 1}), make_conv({"groups": 2, "out_channels": 8}), make_conv({"stride": 2})]
    x = _inputs("conv", 10)
    slots = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0, 0, 2])
    ws = contrib.Workspace()
    shared = [make_accumulator(m, 3, "sample", ws) for m in convs]
    alone = [make_accumulator(m, 3, "sample") for m in convs]
    for start, stop in ((0, 3), (3, 10)):  # interleaved, as in a forward pass
        for acc in shared + alone:
            acc.update(x[start:stop], slots[start:stop])
    for a, b in zip(shared, alone):
        for slot in range(3):
            torch.testing.assert_close(a.s_hat(slot), b.s_hat(slot), rtol=0, atol=0)


def test_accumulator_without_samples_is_zero() -> None:
    m = make_conv({"groups": 2, "out_channels": 8})
    acc = make_accumulator(m, 2, "sample")
    assert torch.equal(acc.s_hat(1), torch.zeros(8, 2, dtype=torch.float64))
    lin = make_accumulator(nn.Linear(3, 2), 1, "mean")
    assert torch.equal(lin.s_hat(0), torch.zeros(2, 3, dtype=torch.float64))


def test_accumulator_dtype_follows_input() -> None:
    m = make_conv({}).float()
    acc = make_accumulator(m, 1, "sample")
    acc.update(torch.randn(2, 4, 6, 6), torch.zeros(2, dtype=torch.long))
    assert acc.s_hat(0).dtype == torch.float32
    acc64 = make_accumulator(m.double(), 1, "sample")
    acc64.update(torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    assert acc64.s_hat(0).dtype == torch.float64


# --- Eq. 5 and class slots ---------------------------------------------------------------------


def test_relative_by_hand() -> None:
    s_hat = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0],
                          [0.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    want = torch.tensor([
        [0.0, 2.0 / (4.0 + EPS), 1.0 / (4.0 + EPS), 4.0 / (4.0 + EPS)],
        [0.0, 0.0, 0.0, 0.0],  # constant rows: 0 / eps
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 2.0 / (2.0 + EPS), 0.0, 1.0 / (2.0 + EPS)],
    ], dtype=torch.float64)
    r = relative(s_hat)
    torch.testing.assert_close(r, want, rtol=0, atol=1e-12)
    assert EPS == 1e-5
    # Batched over leading axes too.
    torch.testing.assert_close(relative(s_hat[None].repeat(2, 1, 1)), want[None].repeat(2, 1, 1), rtol=0, atol=1e-12)
    assert r.max() < 1.0 and r.min() >= 0.0


def test_class_slots_ignores_labels_outside_the_task() -> None:
    labels = torch.tensor([0, 5, 3, 7, -1, 3, 9, 0, 12])
    keep, slots = class_slots(labels, [3, 0, 7], num_classes=8)
    assert keep.tolist() == [True, False, True, True, False, True, False, True, False]
    assert slots.tolist() == [1, 0, 2, 0, 1]
    # A label past the last class is dropped, even though clamping it would land on a task class.
    keep, slots = class_slots(torch.tensor([9, 7, 8]), [7], num_classes=8)
    assert keep.tolist() == [False, True, False] and slots.tolist() == [0]
    keep, slots = class_slots(torch.tensor([1, 2]), [0], num_classes=3)
    assert not keep.any() and slots.numel() == 0
