"""Relative contribution (Eqs. 3-5 of the paper), computed without the B×Q×P×H×W tensor.

For a convolution, Eq. 3 sums each hidden map c_{q,p} ⊗ a_p over the output positions. That sum
is linear: it equals Σ_k c_{q,p}[k] · U_p[k], where U_p[k] sums the input pixels that kernel
offset k touches over all output positions. U costs about one pass over the input (two small
matmuls with 0/1 "touch" matrices), and the contraction is B×Q×P×K instead of B×Q×P×K×H×W.
On maps of at most K pixels (a 2×2 map under a 3×3 kernel) the touch matrix folds into the
weight instead and the contraction runs over the H·W pixels: B×Q×P×H·W.

For a linear layer with per-sample ReLU, Σ_b max(w·a_b, 0) = w⁺·Σ_b a_b⁺ + w⁻·Σ_b a_b⁻ (with
x⁺ = max(x, 0), x⁻ = max(-x, 0)), so only per-class sums of a⁺ and a⁻ are kept: O(P) per class,
never O(B×Q×P). A 1×1 convolution has one weight per (q, p) and takes the same path on U, and
so does any convolution over a one-pixel map, with the folded weight.

`literal_contribution` is the formula as written, for tests and benchmarks.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

EPS = 1e-5
# Largest (samples × Q × P) block materialised at once for convolutions (elements).
CHUNK_ELEMENTS = 1 << 24
# On a CPU the block is contracted, rectified and summed in tiles of input channels of at most
# this many elements (8 MiB in float32): a tile stays in the last-level cache between the three
# passes. Measured on VGG-16's 512-channel layers: the three passes took about half the time of
# one untiled 64 MiB block; 4 MiB and 16 MiB tiles were slower, and tiny tiles add call overhead.
TILE_ELEMENTS = 1 << 21
# Feature maps of at most this many pixels take the one-matmul form of `window_sums`.
KRON_PIXELS = 256
# Class-sorted chunks with at most this many runs of one class are summed by slices (one pass over
# the chunk), not by a one-hot matmul; profiling sorts every CPU batch by class.
SLICE_RUNS = 64


def _explicit_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of `m`, resolving 'same' and 'valid'."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = m.padding
    return (pw, pw, ph, ph)


def pad_input(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`x` padded as `m` pads it: any padding mode, 'same' (even asymmetric) and 'valid' included."""
    pad = _explicit_padding(m)
    if not any(pad):
        return x
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, pad, mode=mode)


# One spatial axis of a convolution: (input size, kernel size, stride, dilation, padding before, output size).
Axis = tuple[int, int, int, int, int, int]


@functools.lru_cache(maxsize=512)
def _touch_on(n_in: int, k: int, stride: int, dilation: int, pad: int, n_out: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    out = torch.arange(n_out)
    t = torch.zeros(k, n_in, dtype=dtype)
    for i in range(k):
        h = out * stride + i * dilation - pad
        t[i, h[(h >= 0) & (h < n_in)]] = 1
    return t.to(device)


def _touch(n_in: int, k: int, stride: int, dilation: int, pad: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """T[i, h] = 1 if kernel offset i reads input row h at some output position. Shape: (k, n_in).

    Built on the CPU once per geometry, device and dtype (cached): boolean indexing on a GPU
    would make every layer wait for the device.
    """
    return _touch_on(n_in, k, stride, dilation, pad, n_out, like.device, like.dtype)


@functools.lru_cache(maxsize=512)
def _touch_product(row_args: Axis, col_args: Axis, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """kron(T_rows, T_cols): kernel offset (i, j) reads pixel (h, w), cached. Shape: (kh*kw, H*W)."""
    rows = _touch_on(*row_args, torch.device("cpu"), dtype)
    cols = _touch_on(*col_args, torch.device("cpu"), dtype)
    return torch.kron(rows, cols).to(device)


def _geometry(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, Axis, Axis]:
    """x (padded for real unless zero-padded) and the row and column arguments of its touch matrices."""
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    left, right, top, bottom = _explicit_padding(m)
    if m.padding_mode != "zeros":  # reflect/replicate/circular padding holds real pixels: pad for real
        x, left, right, top, bottom = pad_input(m, x), 0, 0, 0, 0
    h, w = x.shape[2], x.shape[3]
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    return x, (h, kh, sh, dh, top, ho), (w, kw, sw, dw, left, wo)


def window_sums(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """U[b, p, k]: the input pixels that kernel offset k of `m` touches, summed over output positions.

    Separable: U = T_rows · x · T_colsᵀ with 0/1 "touch" matrices, two small matmuls that handle
    stride, dilation and zero padding without copying the input; on small maps, one matmul with
    their Kronecker product. Shape: x (B, P, H, W) -> (B, P, kh*kw).
    """
    return _window_sums(*_geometry(m, x))


def _window_sums(x: torch.Tensor, row_args: Axis, col_args: Axis) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    if h * w <= KRON_PIXELS:
        # Small maps: one large matmul with the (K, H·W) product of the touch matrices beats the
        # B·P tiny matmuls of the separable form (measured 2-3.5× on 8×8 to 2×2 maps).
        touch = _touch_product(row_args, col_args, x.device, x.dtype)  # (K, H*W)
        # Multiplying by the transposed view is about 2× faster on a CPU than by a contiguous copy.
        return (x.reshape(-1, h * w) @ touch.T).view(x.shape[0], x.shape[1], -1)  # (B*P, H*W) -> (B, P, K)
    rows = _touch(*row_args, x)  # (kh, H)
    cols = _touch(*col_args, x)  # (kw, W)
    return torch.matmul(torch.matmul(rows, x), cols.T).flatten(2)  # (B, P, kh, kw) -> (B, P, K)


def contraction_operands(m: nn.Conv2d, x: torch.Tensor,
                         folded: dict[tuple, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, w) such that s[b, q, p] of Eq. 3 = Σ_j u[b, p, j] · w[p, j, q], with q local to p's group.

    Usually u = U (the window sums) and j runs over the K kernel offsets. On a map of H·W ≤ K
    pixels, U = x·Tᵀ has rank at most H·W, so the touch matrix T folds into the weight instead
    (w·T) and j runs over the pixels: 4 terms instead of 9 on a 2×2 map, and no window sums. A
    convolution with one filter per input channel (depthwise) folds on every map of at most
    `KRON_PIXELS` pixels: its contraction is then one elementwise pass over the input, cheaper
    than the window sums alone (measured 0.2-0.6 ms against 0.8-2.7 ms per MobileNet layer on
    4×4 to 16×16 maps). `folded` memoises the folded weight across calls (it depends only on the
    weight and the map). Shape: x (B, P, H, W) -> u (B, P, J), w (P, J, Qg) with J = K or H·W.
    """
    x, row_args, col_args = _geometry(m, x)
    pixels = x.shape[2] * x.shape[3]
    single_filter = m.out_channels == m.groups  # each input channel feeds one filter (Qg = 1)
    if pixels > math.prod(m.kernel_size) and not (single_filter and pixels <= KRON_PIXELS):
        return _window_sums(x, row_args, col_args), _grouped_weight(m).to(x.dtype)  # (B, P, K), (P, K, Qg)
    key = (row_args, col_args, x.dtype, x.device, m.weight.data_ptr(), m.weight._version)
    w = folded.get(key) if folded is not None else None
    if w is None:
        touch = _touch_product(row_args, col_args, x.device, x.dtype)  # (K, H*W)
        # A batched matmul on the weight's layout, a view of the stored weight unless the convolution
        # is grouped: no (P, K, Qg) copy (measured 1.5 ms on 512×512).
        w = torch.matmul(touch.T, _grouped_weight(m).to(x.dtype))  # (H*W, K) @ (P, K, Qg) -> (P, J, Qg)
        if folded is not None:
            folded.clear()  # one geometry per layer in practice: keep only the latest
            folded[key] = w
    return x.flatten(2), w  # (B, P, H*W), (P, H*W, Qg)


def conv_contribution(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """s[b, q, p] of Eq. 3 for every sample (bias excluded), p local to q's group.

    Shape: x (B, P, H, W) -> (B, Q, P // groups).
    """
    u, w = contraction_operands(m, x)  # (B, P, J), (P, J, Qg)
    g = m.groups
    b, p, j = u.shape
    s = torch.einsum("bgpj,gpjq->bgqp", u.reshape(b, g, p // g, j), w.reshape(g, p // g, j, -1))  # (B, g, Qg, Pg)
    return s.reshape(b, m.out_channels, p // g)  # (B, Q, Pg)


def _grouped_weight(m: nn.Conv2d) -> torch.Tensor:
    """Conv weight laid out for a batched matmul per input channel. Shape: (Q, Pg, kh, kw) -> (P, K, Qg)."""
    g = m.groups
    q, pg = m.out_channels, m.in_channels // g
    w = m.weight.detach().reshape(g, q // g, pg, -1)  # (g, Qg, Pg, K)
    return w.permute(0, 2, 3, 1).reshape(g * pg, -1, q // g)  # (P, K, Qg)


def linear_contribution(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """s[b, q, p] = w[q, p] · a[b, p]. Shape: x (B, P) -> (B, Q, P)."""
    return x[:, None, :] * m.weight[None].to(x.dtype)  # (B, Q, P)


def literal_contribution(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as written: every hidden map a_{q,p} = c_{q,p} ⊗ a_p materialised, then summed.

    Shape: x (B, P, H, W) or (B, P) -> (B, Q, P // groups). Memory O(B·Q·P·H·W): tests only.
    """
    if isinstance(m, nn.Linear):
        return linear_contribution(m, x)
    assert isinstance(m, nn.Conv2d)
    g, q, p = m.groups, m.out_channels, m.in_channels
    qg, pg = q // g, p // g
    w = m.weight.to(x.dtype)  # (Q, Pg, kh, kw)
    # One single-channel filter per (p, q) pair of a group: channel p reads a_p with c_{q,p}.
    per_pair = w.reshape(g, qg, pg, *m.kernel_size).permute(0, 2, 1, 3, 4)  # (g, Pg, Qg, kh, kw)
    per_pair = per_pair.reshape(g * pg * qg, 1, *m.kernel_size)
    hidden = F.conv2d(pad_input(m, x), per_pair, None, m.stride, 0, m.dilation, groups=p)  # (B, P*Qg, Ho, Wo)
    s = hidden.sum((2, 3)).reshape(x.shape[0], g, pg, qg)  # (B, g, Pg, Qg)
    return s.permute(0, 1, 3, 2).reshape(x.shape[0], q, pg)  # (B, Q, Pg)


def relative(s_hat: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 5: min-max normalise over the last axis (inputs p). Shape: (..., Q, P) -> same."""
    lo = s_hat.amin(-1, keepdim=True)
    hi = s_hat.amax(-1, keepdim=True)
    return (s_hat - lo) / (hi - lo + eps)


class Workspace:
    """A reused flat buffer for the per-sample contraction, shared by the layers of one pass.

    Fresh large allocations page-fault on a CPU (measured: about 25% of the profiling time on
    VGG-16); each layer consumes the buffer before the next one asks for it.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._order: tuple[torch.Tensor, int, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def get(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != like.dtype:
            # One allocation per pass: chunks are at most CHUNK_ELEMENTS unless one sample is larger.
            buf = self._buf = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def class_order(self, slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`kernels.class_order` of a batch, computed once for all the layers that see it."""
        memo = self._order
        # Held by reference, so the identity test cannot match a new tensor at a reused address.
        if memo is None or memo[0] is not slots or memo[1:3] != (slots._version, num_slots):
            memo = self._order = (slots, slots._version, num_slots, kernels.class_order(slots, num_slots))
        return memo[3]


def _onehot(slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """Class-by-sample indicator matrix, built without a host sync. Shape: (B,) -> (C, B)."""
    m = torch.zeros(num_slots, slots.shape[0], dtype=dtype, device=slots.device)
    return m.scatter_(0, slots[None], 1)


# How the per-sample contraction, ReLU and class sums of a convolution run: "torch" (chunked
# tensor ops, any device) or "triton" (one fused kernel on a CUDA device, `modellego.core.kernels`).
KERNELS = ("torch", "triton")


MODES = ("sample", "mean")


class LayerAccumulator:
    """Per-class sums of one layer that turn into ŝ (Eq. 4). A plain additive state (all-reducible).

    One subclass per layer kind and mode; `make_accumulator` picks it. ``update`` adds a batch,
    ``s_hat`` reads one class off the sums; batch-size invariant up to summation order.

    Args:
        module: the layer (a Conv2d or Linear).
        num_slots: number of tracked classes.
        workspace: scratch memory shared with the other layers of the same pass.
    """

    module: nn.Conv2d | nn.Linear

    def __init__(self, module: nn.Conv2d | nn.Linear, num_slots: int, workspace: Workspace | None = None) -> None:
        self.module = module
        self.num_slots = num_slots
        self.workspace = workspace or Workspace()
        self.state: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        """Accumulate the samples of `x` (Shape: (B, P, ...)) into their class slots (Shape: (B,))."""
        raise NotImplementedError

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        raise NotImplementedError

    def s_hat(self, slot: int) -> torch.Tensor:
        """ŝ for one class slot (Eq. 4, summed over its samples). Shape: (Q, P // groups)."""
        m = self.module
        if not self.state:
            q = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            p = m.in_channels // m.groups if isinstance(m, nn.Conv2d) else m.in_features
            return torch.zeros(q, p, dtype=torch.float64, device=m.weight.device)
        return self._s_hat(m.weight.detach().to(next(iter(self.state.values())).dtype), slot)

    def _add(self, key: str, slots: torch.Tensor, values: torch.Tensor) -> None:
        if key not in self.state:
            # float32 sums of non-negative terms are ample for thresholds at 0.2-0.4; float64 inputs stay float64.
            dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
            self.state[key] = torch.zeros(self.num_slots, *values.shape[1:], dtype=dtype, device=values.device)
        onehot = _onehot(slots, self.num_slots, self.state[key].dtype)  # (C, B)
        # A matmul with a one-hot matrix: much faster than index_add_ over samples on CPU.
        self.state[key] += (onehot @ values.to(onehot.dtype).flatten(1)).view_as(self.state[key])

    def _add_split(self, slots: torch.Tensor, u: torch.Tensor) -> None:
        """Class sums of u⁺ and u⁻: with one weight per (q, p), ReLU(w·u) = w⁺·u⁺ + w⁻·u⁻ exactly."""
        self._add("pos", slots, u.clamp(min=0))
        self._add("neg", slots, (-u).clamp(min=0))


class LinearSampleAccumulator(LayerAccumulator):
    """Linear layer, ReLU per sample: class sums of x⁺ and x⁻. State: pos, neg (C, P)."""

    module: nn.Linear

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        self._add_split(slots, x.detach())  # (B, P)

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        return w.clamp(min=0) * self.state["pos"][slot] + (-w).clamp(min=0) * self.state["neg"][slot]


class LinearMeanAccumulator(LayerAccumulator):
    """Linear layer, features summed first (the paper's text). State: sum (C, P)."""

    module: nn.Linear

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        self._add("sum", slots, x.detach())

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        return (w * self.state["sum"][slot]).clamp(min=0)


class PointwiseSampleAccumulator(LayerAccumulator):
    """1×1 convolution, ReLU per sample: as a linear layer over the window sums. State: pos, neg (C, P)."""

    module: nn.Conv2d

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        self._add_split(slots, window_sums(self.module, x.detach())[:, :, 0])  # (B, P)

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        m = self.module
        g = m.groups
        wg = w.reshape(g, m.out_channels // g, -1)  # (g, Qg, Pg)
        pos, neg = (self.state[k][slot].reshape(g, 1, -1) for k in ("pos", "neg"))  # (g, 1, Pg)
        return (wg.clamp(min=0) * pos + (-wg).clamp(min=0) * neg).reshape(m.out_channels, -1)  # (Q, Pg)


class ConvMeanAccumulator(LayerAccumulator):
    """Convolution, features summed first: class sums of the window sums U. State: sum (C, P, K)."""

    module: nn.Conv2d

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        self._add("sum", slots, window_sums(self.module, x.detach()))  # (B, P, K)

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        m = self.module
        u = self.state["sum"][slot]  # (P, K)
        g = m.groups
        p, k = u.shape
        wg = w.reshape(g, m.out_channels // g, p // g, k)
        s = torch.einsum("gpk,gqpk->gqp", u.reshape(g, p // g, k), wg)
        return s.reshape(m.out_channels, p // g).clamp(min=0)


class ConvSampleAccumulator(LayerAccumulator):
    """k×k convolution, ReLU per sample: the per-sample contraction s = U·w, ReLU, class sums.

    State: relu_sum (P, C, Qg). How a batch is contracted depends on the shapes it brings: a
    one-pixel map, a depthwise layer, the fused kernel, or chunked batched matmuls.

    Args:
        kernel: one of `KERNELS`.
    """

    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, num_slots: int, workspace: Workspace | None = None,
                 kernel: str = "torch") -> None:
        super().__init__(module, num_slots, workspace)
        self.kernel = kernel
        self._folded: dict[tuple, torch.Tensor] = {}  # folded weight of small maps, not part of the state

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        x = x.detach()
        u_all, w = contraction_operands(self.module, x, self._folded)  # (B, P, J), (P, J, Qg)
        if "relu_sum" not in self.state:
            self.state["relu_sum"] = x.new_zeros(w.shape[0], self.num_slots, w.shape[2])  # (P, C, Qg)
        state = self.state["relu_sum"]
        if u_all.shape[2] == 1:
            self._one_pixel(u_all[:, :, 0], w, slots, state)
        elif w.shape[2] == 1:
            self._depthwise(u_all, w[:, :, 0], slots, state[:, :, 0])
        elif self.kernel == "triton" and state.dtype in kernels.DTYPES:
            # Fused: no per-sample block in memory. Other dtypes take the chunked path.
            kernels.relu_class_sums(u_all, w, slots, state, self.workspace.class_order(slots, self.num_slots))
        else:
            self._chunked(u_all, w, slots, state)

    def _one_pixel(self, u: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, state: torch.Tensor) -> None:
        # One term per (q, p), so as for a linear layer ReLU(u·w) = u⁺·w⁺ + u⁻·w⁻ and the class
        # sums come first. O(C·P·Qg) work, no per-sample tensor.
        onehot = _onehot(slots, self.num_slots, u.dtype)  # (C, B)
        pos, neg = onehot @ u.clamp(min=0), onehot @ (-u).clamp(min=0)  # (C, P)
        wp, wn = w.clamp(min=0), (-w).clamp(min=0)  # (P, 1, Qg)
        state += pos.T[:, :, None] * wp + neg.T[:, :, None] * wn  # (P, C, Qg)

    def _depthwise(self, u_all: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, state: torch.Tensor) -> None:
        # One filter per input channel: s[b, p] is a (B, P) block, an elementwise product summed
        # over j, where P batched matmuls of one column each would be slow.
        step = max(1, CHUNK_ELEMENTS // (u_all.shape[1] * u_all.shape[2]))  # samples per block
        for i in range(0, u_all.shape[0], step):
            s = (u_all[i: i + step] * w).sum(-1).clamp_(min=0)  # (b, P, J) -> (b, P)
            onehot = _onehot(slots[i: i + step], self.num_slots, s.dtype)  # (C, b)
            state += (onehot @ s).T  # (P, C)

    def _chunked(self, u_all: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, state: torch.Tensor) -> None:
        m = self.module
        step = max(1, CHUNK_ELEMENTS // (m.out_channels * (m.in_channels // m.groups)))  # samples per block
        cpu = u_all.device.type == "cpu"
        for i in range(0, u_all.shape[0], step):
            u = u_all[i: i + step].transpose(0, 1)  # (P, b, J)
            p, b, qg = u.shape[0], u.shape[1], w.shape[2]
            runs = _class_runs(slots[i: i + step]) if cpu else None
            # Without runs, one batched matmul sums by class: index_add over samples is several times
            # slower on a CPU, and on a GPU this path never waits for the device (no unique()).
            onehot = _onehot(slots[i: i + step], self.num_slots, u.dtype) if runs is None else None  # (C, b)
            tile = max(1, TILE_ELEMENTS // (b * qg)) if cpu else p
            for j in range(0, p, tile):
                t = min(tile, p - j)
                s = torch.bmm(u[j: j + t], w[j: j + t], out=self.workspace.get((t, b, qg), u))  # (t, b, Qg)
                s.clamp_(min=0)  # ReLU per sample, in place
                if onehot is not None:
                    state[j: j + t] += torch.matmul(onehot, s)  # (C, b) @ (t, b, Qg) -> (t, C, Qg)
                    continue
                for c, first, n in runs or ():
                    state[j: j + t, c] += s[:, first: first + n].sum(1)  # (t, Qg)

    def _s_hat(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        g = self.module.groups
        per_p = self.state["relu_sum"][:, slot, :]  # (P, Qg)
        p, qg = per_p.shape
        return per_p.reshape(g, p // g, qg).transpose(1, 2).reshape(g * qg, p // g)  # (Q, Pg)


def make_accumulator(module: nn.Module, num_slots: int, mode: str = "sample", workspace: Workspace | None = None,
                     kernel: str = "torch") -> LayerAccumulator:
    """The accumulator for `module`'s kind and `mode`.

    Args:
        module: a Conv2d or Linear.
        num_slots: number of tracked classes.
        mode: "sample" (ReLU per sample, then sum: the reference) or "mean" (sum features, then
            ReLU: the paper's text).
        workspace: scratch memory shared with the other layers of the same pass.
        kernel: one of `KERNELS` (k×k convolutions in "sample" mode; the others need no kernel).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(module, nn.Linear):
        return (LinearSampleAccumulator if mode == "sample" else LinearMeanAccumulator)(module, num_slots, workspace)
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"contributions are defined for Conv2d and Linear layers, got {type(module).__name__}")
    if mode == "mean":
        return ConvMeanAccumulator(module, num_slots, workspace)
    if module.kernel_size == (1, 1):
        return PointwiseSampleAccumulator(module, num_slots, workspace)
    return ConvSampleAccumulator(module, num_slots, workspace, kernel)


def _class_runs(slots: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(slot, first, count) of each run of equal slots, or None past SLICE_RUNS runs (a host sync)."""
    values, counts = torch.unique_consecutive(slots, return_counts=True)
    if len(values) > SLICE_RUNS:
        return None
    firsts = [0, *torch.cumsum(counts, 0).tolist()[:-1]]
    return list(zip(values.tolist(), firsts, counts.tolist()))


def class_slots(labels: torch.Tensor, classes: Sequence[int], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map labels to slots of `classes`; returns (sample mask, slot per kept sample)."""
    lookup = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
    lookup[torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)] = torch.arange(
        len(classes), device=labels.device)
    slots = lookup[labels.clamp(0, num_classes - 1)]
    keep = (slots >= 0) & (labels >= 0) & (labels < num_classes)
    return keep, slots[keep]
